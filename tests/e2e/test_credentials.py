"""Federated credentials end to end: the agent holds a placeholder, Google sees real tokens.

The testbed cloud's upstream accepts only tokens its stub token services issued (see
testbed/token_verifier.py) and logs a fingerprint of every token it checked; the stubs log a
fingerprint of every token they issued and write the tokens themselves to a test-only file, so
these tests can compare the two and search recordings, logs and the agent's environment for
any real token.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from appliance.bigquery import rest
from appliance.config import AgentProfile, Config, CredentialsConfig
from appliance.context import fingerprint
from appliance.credentials import TokenSource, outbound_session
from testbed import identities as identities_module
from testbed.cloud import Cloud
from tests.e2e.conftest import REPO, Appliance, session_id_of, write_config

pytestmark = pytest.mark.e2e

ALLOW = ["bigquery.googleapis.com", "bigquerystorage.googleapis.com", "www.googleapis.com",
         "oauth2.googleapis.com", "sts.googleapis.com", "iamcredentials.googleapis.com"]
BIGQUERY = "https://bigquery.googleapis.com/bigquery/v2/projects/demo-project"
BROUGHT_TOKEN = "ya29.a0Af-agent-brought-token"
STOLEN_REFRESH_TOKEN = "1//agent-stolen-refresh-token"
AGENT_KEY = "AIzaSyAgentBroughtKey"

FOREIGN_AGENT = f"""
import json
import requests
from google.api_core import exceptions
from google.cloud import bigquery
from google.oauth2.credentials import Credentials

BIGQUERY = {BIGQUERY!r}
results = {{}}
client = bigquery.Client(project="demo-project", credentials=Credentials(token={BROUGHT_TOKEN!r}))
try:
    list(client.list_datasets())
    results["client"] = 200
except exceptions.GoogleAPICallError as error:
    results["client"] = error.code
except Exception as error:  # A 401 makes google-auth try a refresh it cannot do.
    results["client"] = type(error).__name__
response = requests.get(BIGQUERY + "/datasets",
                        headers={{"Authorization": "Bearer " + {BROUGHT_TOKEN!r}}}, timeout=30)
results["brought_token"] = response.status_code
response = requests.post("https://oauth2.googleapis.com/token", timeout=30,
                         data={{"grant_type": "refresh_token",
                               "refresh_token": {STOLEN_REFRESH_TOKEN!r}}})
results["token_call"] = response.status_code
response = requests.get(BIGQUERY + "/datasets", params={{"key": {AGENT_KEY!r}}}, timeout=30)
results["api_key"] = response.status_code
print(json.dumps(results))
"""

TWO_QUERIES_APART = """
import time
from google.cloud import bigquery

client = bigquery.Client()
print("first", list(client.query_and_wait("SELECT 1 AS x"))[0].x, flush=True)
time.sleep(6)
print("second", list(client.query_and_wait("SELECT 2 AS x"))[0].x, flush=True)
"""

PRINT_PLACEHOLDER = """
import google.auth
import google.auth.transport.requests

credentials, project = google.auth.default()
credentials.refresh(google.auth.transport.requests.Request())
print("placeholder", credentials.token)
print("email", credentials.service_account_email)
"""


class LogCursor:
    """Reads the lines a cloud log gained since the cursor was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as file:
            file.seek(self.offset)
            return file.read().decode(errors="replace").splitlines()


@pytest.fixture
def token_logs(cloud: Cloud) -> dict[str, LogCursor]:
    return {"upstream": LogCursor(cloud.log_dir / "upstream.log"),
            "stubs": LogCursor(cloud.log_dir / "stubs.log"),
            "tokens": LogCursor(cloud.issued_tokens_file)}


def _checked(cursor: LogCursor, verdict: str) -> list[str]:
    """Fingerprints of the tokens the upstream accepted or rejected since the cursor."""
    return [line.split()[2] for line in cursor.lines()
            if line.startswith(f"token-check {verdict} ")]


def _issued(cursor: LogCursor, principal: str | None = None) -> list[str]:
    return [line.split()[1] for line in cursor.lines() if line.startswith("issued ")
            and (principal is None or f"principal={principal} " in line)]


def _configure(appliance: Appliance, cloud: Cloud, shared_dirs: dict[str, Path],
               **profile: Any) -> None:
    write_config(appliance.config_path, cloud, appliance.store, shared_dirs,
                 {"agent": {"project": cloud.project, "allow_hosts": ALLOW, **profile}})


def _store_bytes(store: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(store.rglob("*")) if path.is_file())


def _cloud_config(cloud: Cloud) -> Config:
    return Config(upstream_ca_file=cloud.ca_file, hosts=dict(cloud.hosts))


def test_example_agent_sends_only_real_tokens(appliance: Appliance, cloud: Cloud,
                                              token_logs: dict[str, LogCursor]) -> None:
    shutil.copy(REPO / "examples" / "agent.py", appliance.workspace / "agent.py")
    (appliance.workspace / "placeholder.py").write_text(PRINT_PLACEHOLDER)
    # The appliance logs at its most detailed level, so that its log output is searched whole.
    command = appliance.command("run", "--agent-cmd",
                                "env; python placeholder.py; python agent.py",
                                "--env", f"PATH={appliance.agent_path()}",
                                "--env", "AGENT_DATASET=real_tokens")
    result = subprocess.run([*command[:3], "--log-level", "debug", *command[3:]],
                            cwd=appliance.workspace, capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    session_id = session_id_of(result)
    assert cloud.identities is not None
    placeholder = next(line.split()[1] for line in result.stdout.splitlines()
                       if line.startswith("placeholder "))
    real_tokens = token_logs["tokens"].lines()
    accepted = _checked(token_logs["upstream"], "accepted")

    assert "gold: ['ada', 'alan']" in result.stdout
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in result.stdout
    assert f"email {cloud.identities.runner}" in result.stdout
    assert accepted
    assert _checked(token_logs["upstream"], "rejected") == []
    assert set(accepted) <= set(_issued(token_logs["stubs"], cloud.identities.runner))
    assert fingerprint(placeholder) not in accepted
    assert real_tokens
    haystacks = {"store": _store_bytes(appliance.store),
                 "appliance log": result.stderr.encode(),
                 "agent output and environment": result.stdout.encode(),
                 "events": json.dumps(appliance.query(
                     f"SELECT * FROM events WHERE session_id = '{session_id}'")).encode()}
    leaks = [(name, fingerprint(token)) for token in real_tokens
             for name, haystack in haystacks.items() if token.encode() in haystack]
    assert leaks == []


def test_recording_names_real_principal(appliance: Appliance, cloud: Cloud) -> None:
    result = appliance.run_agent("true")
    session_id = session_id_of(result)
    assert cloud.identities is not None

    rows = appliance.query("SELECT principal, json_extract_string(detail, '$.principal_source') "
                           "AS how, json_extract_string(detail, '$.credential_source') AS source "
                           f"FROM events JOIN sessions USING (session_id) WHERE session_id = "
                           f"'{session_id}' AND kind = 'session_start'")

    assert rows == [{"principal": cloud.identities.runner,
                     "how": "service account of the credential",
                     "source": "service_account_key"}]


def test_impersonated_session_records_target(appliance: Appliance, cloud: Cloud,
                                             shared_dirs: dict[str, Path],
                                             token_logs: dict[str, LogCursor]) -> None:
    assert cloud.identities is not None
    ids = cloud.identities
    _configure(appliance, cloud, shared_dirs, principal=ids.analyst, credentials={
        "source": "impersonate", "file": str(ids.service_account_key),
        "target_principal": ids.analyst, "delegates": [ids.delegate]})
    (appliance.workspace / "agent.py").write_text(
        "from google.cloud import bigquery\n"
        "print(list(bigquery.Client().query_and_wait('SELECT SESSION_USER() AS u'))[0].u)\n")

    result = appliance.run_agent("python agent.py")

    assert result.stdout.strip() == ids.analyst
    assert appliance.replay(session_id_of(result))["session"]["principal"] == ids.analyst
    assert set(_checked(token_logs["upstream"], "accepted")) <= \
        set(_issued(token_logs["stubs"], ids.analyst))


def test_configured_principal_must_match_token(appliance: Appliance, cloud: Cloud,
                                               shared_dirs: dict[str, Path]) -> None:
    _configure(appliance, cloud, shared_dirs,
               principal="someone-else@demo-project.iam.gserviceaccount.com")

    result = appliance.run_agent("true", check_exit=2)

    assert "belongs to 'agent-runner@demo-project.iam.gserviceaccount.com'" in result.stderr


def test_foreign_credentials_refused_and_recorded(appliance: Appliance, cloud: Cloud,
                                                  shared_dirs: dict[str, Path],
                                                  token_logs: dict[str, LogCursor]) -> None:
    _configure(appliance, cloud, shared_dirs)
    (appliance.workspace / "foreign.py").write_text(FOREIGN_AGENT)

    result = appliance.run_agent("python foreign.py")
    session_id = session_id_of(result)
    statuses = json.loads(result.stdout.splitlines()[-1])
    blocked = appliance.query(
        "SELECT host, credential, json_extract_string(detail, '$.reason') AS reason FROM events "
        f"WHERE session_id = '{session_id}' AND kind = 'blocked' ORDER BY seq")

    assert statuses == {"client": 403, "brought_token": 403, "token_call": 403, "api_key": 403}
    assert [row["credential"] for row in blocked if "OAuth access token" in row["reason"]] == \
        [f"bearer:{fingerprint(BROUGHT_TOKEN)}"] * 2
    token_call = [row for row in blocked if row["host"] == "oauth2.googleapis.com"]
    assert len(token_call) == 1
    assert f"refresh_token {fingerprint(STOLEN_REFRESH_TOKEN)}" in token_call[0]["reason"]
    assert [row["credential"] for row in blocked if "API key" in row["reason"]] == \
        [f"api-key:{fingerprint(AGENT_KEY)}"]
    assert fingerprint(BROUGHT_TOKEN) not in _checked(token_logs["upstream"], "rejected")
    assert BROUGHT_TOKEN.encode() not in _store_bytes(appliance.store)


def test_profile_may_pass_foreign_credentials(appliance: Appliance, cloud: Cloud,
                                              shared_dirs: dict[str, Path],
                                              token_logs: dict[str, LogCursor]) -> None:
    _configure(appliance, cloud, shared_dirs, allow_foreign_credentials=True)
    (appliance.workspace / "foreign.py").write_text(FOREIGN_AGENT)

    result = appliance.run_agent("python foreign.py")
    statuses = json.loads(result.stdout.splitlines()[-1])

    # Passed through, Google (the verifying upstream, the stub token service) refuses them.
    assert statuses["brought_token"] == 401
    assert statuses["token_call"] == 401
    assert fingerprint(BROUGHT_TOKEN) in _checked(token_logs["upstream"], "rejected")


def test_short_lived_token_refreshed_between_queries(appliance: Appliance, cloud: Cloud,
                                                     shared_dirs: dict[str, Path],
                                                     token_logs: dict[str, LogCursor]) -> None:
    assert cloud.identities is not None
    _configure(appliance, cloud, shared_dirs, credentials={
        "source": "service_account_key", "file": str(cloud.identities.short_lived_key)})
    (appliance.workspace / "agent.py").write_text(TWO_QUERIES_APART)

    result = appliance.run_agent("python agent.py")
    accepted = _checked(token_logs["upstream"], "accepted")
    issued = _issued(token_logs["stubs"], cloud.identities.short_lived)

    assert result.stdout.split() == ["first", "1", "second", "2"]
    assert _checked(token_logs["upstream"], "rejected") == []
    assert len(set(accepted)) >= 2
    assert set(accepted) <= set(issued)


def _source_profiles(cloud: Cloud) -> dict[str, tuple[CredentialsConfig, str]]:
    assert cloud.identities is not None
    ids = cloud.identities
    return {
        "impersonate": (CredentialsConfig(source="impersonate", file=ids.service_account_key,
                                          target_principal=ids.analyst,
                                          delegates=(ids.delegate,)), ids.analyst),
        "impersonate_from_user": (CredentialsConfig(source="impersonate",
                                                    file=ids.authorized_user,
                                                    target_principal=ids.analyst), ids.analyst),
        "external_account": (CredentialsConfig(source="external_account",
                                               file=ids.external_account),
                             ids.workload_principal),
        "external_account_impersonating": (
            CredentialsConfig(source="external_account",
                              file=ids.external_account_impersonating), ids.federated_agent),
        "authorized_user": (CredentialsConfig(source="authorized_user",
                                              file=ids.authorized_user),
                            identities_module.USER_EMAIL),
    }


@pytest.mark.parametrize("name", ["impersonate", "impersonate_from_user", "external_account",
                                  "external_account_impersonating", "authorized_user"])
def test_source_mints_at_real_host_names(cloud: Cloud, name: str) -> None:
    settings, principal = _source_profiles(cloud)[name]
    config = _cloud_config(cloud)
    tokens = TokenSource.for_profile(AgentProfile(name=name, credentials=settings), config)

    identity = tokens.identify()
    response = outbound_session(config).get(
        f"{BIGQUERY}/datasets", timeout=30,
        headers={"Authorization": f"Bearer {tokens.token_sync().value}"})

    assert identity.principal == principal
    assert response.status_code == 200


def _create_job_directly(cloud: Cloud, label: str) -> str:
    """Run a job as the session's principal straight at the upstream, bypassing the appliance."""
    assert cloud.identities is not None
    config = _cloud_config(cloud)
    tokens = TokenSource.for_profile(AgentProfile(name="outside", credentials=CredentialsConfig(
        source="service_account_key", file=cloud.identities.service_account_key)), config)
    job_id = f"behind-the-back-{secrets.token_hex(4)}"
    response = outbound_session(config).post(
        f"{BIGQUERY}/jobs", timeout=30,
        headers={"Authorization": f"Bearer {tokens.token_sync().value}"},
        json={"jobReference": {"projectId": "demo-project", "jobId": job_id},
              "configuration": {"query": {"query": "SELECT 42", "useLegacySql": False},
                                "labels": {"appliance-session": label}}})
    assert response.status_code == 200, response.text
    return job_id


def test_reconcile_matches_clean_session(appliance: Appliance) -> None:
    shutil.copy(REPO / "examples" / "agent.py", appliance.workspace / "agent.py")
    session_id = session_id_of(appliance.run_agent("python agent.py", "--env",
                                                   "AGENT_DATASET=reconcile_clean"))

    result = appliance.cli("sessions", "reconcile", session_id, "--json", check=False)
    report = json.loads(result.stdout)

    assert result.returncode == 0, result.stderr
    assert report["match"] is True
    assert len(report["matched"]) == 4


def test_reconcile_finds_jobs_outside_recording(appliance: Appliance, cloud: Cloud) -> None:
    shutil.copy(REPO / "examples" / "agent.py", appliance.workspace / "agent.py")
    process = subprocess.Popen(
        appliance.command("run", "--agent-cmd", "python agent.py && echo ready && read line",
                          "--env", f"PATH={appliance.agent_path()}",
                          "--env", "AGENT_DATASET=reconcile_outside"),
        cwd=appliance.workspace, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None and process.stdout is not None
        session_id = process.stderr.readline().split()[2]
        while (line := process.stdout.readline()) and line.strip() != "ready":
            pass
        behind = _create_job_directly(cloud, rest.label_value(session_id))
        _, errors = process.communicate("\n", timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, errors
    deleted = appliance.query("SELECT job_id FROM statements WHERE session_id = "
                              f"'{session_id}' AND statement_type = 'UPDATE'")[0]["job_id"]
    config = _cloud_config(cloud)
    assert cloud.identities is not None
    tokens = TokenSource.for_profile(AgentProfile(name="outside", credentials=CredentialsConfig(
        source="service_account_key", file=cloud.identities.service_account_key)), config)
    outbound_session(config).delete(f"{BIGQUERY}/jobs/{deleted}/delete", timeout=30,
                                    headers={"Authorization":
                                             f"Bearer {tokens.token_sync().value}"})

    result = appliance.cli("sessions", "reconcile", session_id, "--json", check=False)
    report = json.loads(result.stdout)
    text = appliance.cli("sessions", "reconcile", session_id, check=False).stdout

    assert result.returncode == 7, result.stderr
    assert [job["job_id"] for job in report["missing_from_recording"]] == [behind]
    assert [job["job_id"] for job in report["unknown_to_bigquery"]] == [deleted]
    assert report["principal"] == cloud.identities.runner
    assert f"MISSING FROM RECORDING demo-project:US.{behind}" in text
