"""`appliance sessions reconcile SESSION`: compare a recording with BigQuery's own job history.

With the agent profile's credential (minted as for a session, through the appliance's own
host overrides and trust settings), it lists the jobs BigQuery has for the session's
principal (jobs.list, projection full, the principal's own jobs only) in every project the
session used, created between the session's start and end (widened by --margin seconds).
A listed job belongs to the session when it carries the session's job label, and is suspect
when it carries no such label at all; jobs labelled for another session are left out. It
reports:

- jobs BigQuery ran that the recording does not have (made behind the recorder's back, for
  example with a copy of the principal's credential);
- jobs the recording names that BigQuery does not know (checked once more with jobs.get).

Exit codes: 0 when they match, 7 when they differ, and the CLI's usual codes for errors
(2 configuration or credential, 5 store, 6 session not found).
"""

from __future__ import annotations

import datetime
import logging
import pwd
import urllib.parse
from dataclasses import dataclass, field
from typing import Annotated, Any

import requests
import typer

from appliance import config as config_module
from appliance.bigquery import rest
from appliance.commands.render import ConfigOption, JsonOption, print_json, stdout
from appliance.config import AgentProfile
from appliance.errors import ApplianceError, ConfigError, CredentialError

logger = logging.getLogger(__name__)

RECONCILE_DIFFER_EXIT = 7
BIGQUERY_API = "https://bigquery.googleapis.com/bigquery/v2"
PAGE_SIZE = 1000
TIMEOUT_SECONDS = 60.0
RECORDED_JOBS_SQL = """
SELECT DISTINCT project, location, job_id, api_method, statement_type
FROM statements
WHERE session_id = ? AND job_id IS NOT NULL AND NOT dry_run
ORDER BY job_id
"""


@dataclass(frozen=True)
class RecordedJob:
    project: str | None
    location: str | None
    job_id: str
    api_method: str | None = None
    statement_type: str | None = None


@dataclass
class Report:
    """The outcome of one reconciliation, ready for JSON."""

    session_id: str
    principal: str | None
    projects: list[str]
    window: dict[str, str]
    label: dict[str, str] | None
    listed: int = 0
    matched: list[str] = field(default_factory=list)
    missing_from_recording: list[dict[str, Any]] = field(default_factory=list)
    unknown_to_bigquery: list[dict[str, Any]] = field(default_factory=list)
    other_sessions: int = 0

    @property
    def match(self) -> bool:
        return not self.missing_from_recording and not self.unknown_to_bigquery

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "principal": self.principal,
            "projects": self.projects, "window": self.window, "label": self.label,
            "match": self.match, "listed": self.listed, "matched": self.matched,
            "missing_from_recording": self.missing_from_recording,
            "unknown_to_bigquery": self.unknown_to_bigquery,
            "other_sessions": self.other_sessions,
        }


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """Pick what a reviewer needs from a jobs.list entry (the SQL is cut at 200 characters)."""
    reference = job.get("jobReference") or {}
    configuration = job.get("configuration") or {}
    query = (configuration.get("query") or {}).get("query")
    created = (job.get("statistics") or {}).get("creationTime")
    return {
        "project": reference.get("projectId"),
        "location": reference.get("location"),
        "job_id": reference.get("jobId"),
        "state": job.get("state") or (job.get("status") or {}).get("state"),
        "job_type": configuration.get("jobType"),
        "created_at": _from_millis(created),
        "user_email": job.get("user_email"),
        "labels": configuration.get("labels") or {},
        "query": query[:200] if isinstance(query, str) else None,
    }


def compare(report: Report, listed: list[dict[str, Any]], recorded: list[RecordedJob],
            label_key: str | None, label_value: str) -> list[RecordedJob]:
    """Fill `report` from BigQuery's listing; return recorded jobs the listing lacks."""
    recorded_ids = {(job.project, job.job_id) for job in recorded}
    seen: set[tuple[str | None, str]] = set()
    report.listed = len(listed)
    for job in listed:
        summary = job_summary(job)
        key = (summary["project"], summary["job_id"])
        seen.add(key)
        label = summary["labels"].get(label_key) if label_key else None
        if label_key and label is not None and label != label_value:
            report.other_sessions += 1
            continue
        if key in recorded_ids:
            report.matched.append(str(summary["job_id"]))
        else:
            report.missing_from_recording.append(summary)
    return [job for job in recorded if (job.project, job.job_id) not in seen]


class JobsClient:
    """Lists and gets BigQuery jobs with one principal's token."""

    def __init__(self, session: requests.Session, token: str) -> None:
        self.session = session
        self._headers = {"Authorization": f"Bearer {token}"}

    def _get(self, url: str, params: dict[str, str]) -> requests.Response:
        try:
            return self.session.get(url, params=params, headers=self._headers,
                                    timeout=TIMEOUT_SECONDS)
        except requests.RequestException as error:
            raise ApplianceError(f"Cannot reach BigQuery at {url}: "
                                 f"{error.__class__.__name__}.") from error

    def list_jobs(self, project: str, start_ms: int, end_ms: int) -> list[dict[str, Any]]:
        url = f"{BIGQUERY_API}/projects/{urllib.parse.quote(project, safe='')}/jobs"
        params = {"projection": "full", "minCreationTime": str(start_ms),
                  "maxCreationTime": str(end_ms), "maxResults": str(PAGE_SIZE)}
        jobs: list[dict[str, Any]] = []
        while True:
            response = self._get(url, params)
            _raise_for(response, f"jobs.list in project {project}")
            body = response.json()
            jobs += [job for job in body.get("jobs") or [] if isinstance(job, dict)]
            token = body.get("nextPageToken")
            if not token:
                return jobs
            params["pageToken"] = token

    def exists(self, job: RecordedJob) -> bool:
        if job.project is None:
            return False
        url = (f"{BIGQUERY_API}/projects/{urllib.parse.quote(job.project, safe='')}/jobs/"
               f"{urllib.parse.quote(job.job_id, safe='')}")
        response = self._get(url, {"location": job.location} if job.location else {})
        if response.status_code == 404:
            return False
        _raise_for(response, f"jobs.get of job {job.job_id}")
        return True


def _raise_for(response: requests.Response, call: str) -> None:
    if response.status_code == 200:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.reason
    error = CredentialError if response.status_code in (401, 403) else ApplianceError
    raise error(f"BigQuery refused {call} with HTTP {response.status_code}: {message}")


def _from_millis(value: Any) -> str | None:
    try:
        moment = datetime.datetime.fromtimestamp(int(value) / 1000, datetime.UTC)
    except (TypeError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _millis(moment: datetime.datetime) -> int:
    return int(moment.replace(tzinfo=datetime.UTC).timestamp() * 1000)


def _agent_uid(profile: AgentProfile) -> int | None:
    try:
        return pwd.getpwnam(profile.user).pw_uid
    except KeyError:
        return None


def reconcile(
    session_id: Annotated[str, typer.Argument(help="Session id, as printed by run and list.")],
    margin: Annotated[float, typer.Option(
        "--margin", help="Seconds added before the session's start and after its end when "
                         "listing jobs, for clock differences.")] = 5.0,
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compare a session's recorded jobs with the jobs BigQuery has for its principal."""
    from appliance.credentials import TokenSource, outbound_session
    from appliance.recordings.replay import plain, session_detail
    from appliance.recordings.store import Store

    if margin < 0:
        raise ConfigError(f"--margin {margin} is negative; give a number of seconds >= 0.")
    config = config_module.load(config_path)
    store = Store(config.store_path)
    session = session_detail(store, session_id)
    profile = config.profile(session["agent"])
    tokens = TokenSource.for_profile(profile, config, session["operator"], _agent_uid(profile))
    identity = tokens.identify()
    if session["principal"] and identity.principal != session["principal"]:
        raise CredentialError(
            f"Session {session_id} ran as {session['principal']!r}, but the credential of agent "
            f"profile {profile.name!r} now belongs to {identity.principal!r}; BigQuery would "
            "list another principal's jobs. Reconcile with the profile the session used.")
    with store.query_connection() as connection:
        rows = connection.execute(RECORDED_JOBS_SQL, [session_id]).fetchall()
    recorded = [RecordedJob(*row) for row in rows]
    started = session["started_at"] - datetime.timedelta(seconds=margin)
    ended = (session["ended_at"] or datetime.datetime.now(datetime.UTC).replace(tzinfo=None)) \
        + datetime.timedelta(seconds=margin)
    projects = sorted({job.project for job in recorded if job.project}
                      | {p for p in (session["project"], profile.project) if p})
    if not projects:
        raise ConfigError(f"Session {session_id} names no project and agent profile "
                          f"{profile.name!r} has none; set 'project' in the profile.")
    label_value = rest.label_value(session_id)
    report = Report(session_id, identity.principal, projects,
                    {"from": plain(started), "to": plain(ended)},
                    {profile.job_label_key: label_value} if profile.job_label_key else None)
    client = JobsClient(outbound_session(config), tokens.token_sync().value)
    listed = [job for project in projects
              for job in client.list_jobs(project, _millis(started), _millis(ended))]
    unlisted = compare(report, listed, recorded, profile.job_label_key, label_value)
    for job in unlisted:
        if client.exists(job):
            report.matched.append(job.job_id)
        else:
            report.unknown_to_bigquery.append({"project": job.project, "location": job.location,
                                               "job_id": job.job_id, "api_method": job.api_method,
                                               "statement_type": job.statement_type})
    if as_json:
        print_json(report.as_dict())
    else:
        _print(report, session["ended_at"] is None)
    if not report.match:
        raise typer.Exit(RECONCILE_DIFFER_EXIT)


def _print(report: Report, running: bool) -> None:
    stdout.print(f"Session {report.session_id}, principal {report.principal}, projects "
                 f"{', '.join(report.projects)}", markup=False)
    stdout.print(f"  jobs created {report.window['from']} .. {report.window['to']}"
                 f"{' (session still running)' if running else ''}: {report.listed} listed, "
                 f"{len(report.matched)} matched, {report.other_sessions} of other sessions",
                 markup=False)
    for job in report.missing_from_recording:
        stdout.print(f"MISSING FROM RECORDING {job['project']}:{job['location']}.{job['job_id']} "
                     f"{job['state']} created {job['created_at']} "
                     f"{job['query'] or job['job_type'] or ''}", markup=False)
    for job in report.unknown_to_bigquery:
        stdout.print(f"UNKNOWN TO BIGQUERY {job['project']}:{job['location']}.{job['job_id']} "
                     f"{job['api_method'] or ''} {job['statement_type'] or ''}", markup=False)
    stdout.print("match" if report.match else "MISMATCH", markup=False)
