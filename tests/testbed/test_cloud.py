"""End-to-end checks of the testbed cloud from the host namespace, without the proxy.

The BigQuery clients are used as shipped (no endpoint override): only name resolution is
pointed at the cloud (socket.getaddrinfo in this process; /etc/hosts in a private mount
namespace for the gRPC client) and the test CA is trusted through the usual variables.
Needs root and APPLIANCE_UPSTREAM_PYTHON (the upstream venv's python).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

bigquery = pytest.importorskip("google.cloud.bigquery")
pytest.importorskip("pyroute2")
from google.oauth2.credentials import Credentials

from testbed.cloud import UPSTREAM_PYTHON_ENV, Cloud, CloudError

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def _skip_unless_possible() -> str:
    if os.geteuid() != 0:
        pytest.skip("the testbed cloud needs root for network namespaces")
    python = os.environ.get(UPSTREAM_PYTHON_ENV)
    if not python:
        pytest.skip(f"set {UPSTREAM_PYTHON_ENV} to the upstream venv's python")
    return python


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    python = _skip_unless_possible()
    with Cloud(tmp_path_factory.mktemp("cloud"), python) as running:
        yield running


@pytest.fixture(scope="module")
def client(cloud: Cloud) -> Iterator[bigquery.Client]:
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        return real_getaddrinfo(cloud.hosts.get(host, host), port, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", getaddrinfo)
        for name, value in cloud.client_env().items():
            patch.setenv(name, value)
        for name in PROXY_VARIABLES:
            patch.delenv(name, raising=False)
        yield bigquery.Client(
            project=cloud.project, credentials=Credentials(token="testbed-placeholder-token")
        )


@pytest.fixture(scope="module")
def dataset(client: bigquery.Client) -> str:
    dataset_id = f"testbed_{secrets.token_hex(4)}"
    created = client.create_dataset(dataset_id)
    assert created.dataset_id == dataset_id
    return f"{client.project}.{dataset_id}"


@pytest.fixture(scope="module")
def people(client: bigquery.Client, dataset: str) -> str:
    table = bigquery.Table(
        f"{dataset}.people",
        schema=[
            bigquery.SchemaField("name", "STRING", mode="REQUIRED"),
            bigquery.SchemaField("age", "INT64"),
        ],
    )
    created = client.create_table(table)
    assert [field.name for field in created.schema] == ["name", "age"]
    errors = client.insert_rows_json(
        created, [{"name": "ada", "age": 36}, {"name": "bob", "age": 41}, {"name": "cy", "age": 7}]
    )
    assert errors == []
    return created.full_table_id.replace(":", ".")


def rows(client: bigquery.Client, sql: str, **config: object) -> list[tuple]:
    job = client.query(sql, job_config=bigquery.QueryJobConfig(**config))
    return [tuple(row.values()) for row in job.result()]


def test_created_dataset_is_listed(client: bigquery.Client, dataset: str) -> None:
    assert dataset.split(".")[1] in [d.dataset_id for d in client.list_datasets()]


def test_inserted_rows_are_returned_by_select(client: bigquery.Client, people: str) -> None:
    assert rows(client, f"SELECT name, age FROM `{people}` ORDER BY name") == [
        ("ada", 36),
        ("bob", 41),
        ("cy", 7),
    ]


def test_parameterized_query_filters_by_the_parameter(client: bigquery.Client, people: str) -> None:
    result = rows(
        client,
        f"SELECT name FROM `{people}` WHERE age > @min_age ORDER BY name",
        query_parameters=[bigquery.ScalarQueryParameter("min_age", "INT64", 30)],
    )
    assert result == [("ada",), ("bob",)]


def test_dry_run_reports_a_plan_without_running(client: bigquery.Client, people: str) -> None:
    job = client.query(
        f"SELECT name FROM `{people}`", job_config=bigquery.QueryJobConfig(dry_run=True)
    )
    assert job.dry_run is True
    assert job.total_bytes_processed is not None


def test_dml_reports_affected_row_counts(client: bigquery.Client, dataset: str) -> None:
    table = f"{dataset}.dml_target"
    client.query(f"CREATE TABLE `{table}` (k INT64, v STRING)").result()
    client.query(f"INSERT INTO `{table}` VALUES (1, 'a'), (2, 'b'), (3, 'c')").result()

    update = client.query(f"UPDATE `{table}` SET v = 'z' WHERE k >= 2")
    update.result()
    assert update.num_dml_affected_rows == 2

    delete = client.query(f"DELETE FROM `{table}` WHERE k = 1")
    delete.result()
    assert delete.num_dml_affected_rows == 1
    assert rows(client, f"SELECT k, v FROM `{table}` ORDER BY k") == [(2, "z"), (3, "z")]


@pytest.mark.parametrize("upload", ["multipart", "resumable"])
def test_csv_upload_loads_rows(client: bigquery.Client, dataset: str, upload: str) -> None:
    table = f"{dataset}.loaded_{upload}"
    data = b"id,label\n1,one\n2,two\n"
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.CSV,
        skip_leading_rows=1,
        schema=[bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("label", "STRING")],
    )
    # The client sends a known size under 5 MB as multipart and an unknown size as resumable.
    size = len(data) if upload == "multipart" else None
    job = client.load_table_from_file(io.BytesIO(data), table, size=size, job_config=config)
    job.result()
    assert job.output_rows == 2
    assert rows(client, f"SELECT id, label FROM `{table}` ORDER BY id") == [(1, "one"), (2, "two")]


def test_storage_read_api_streams_the_table_over_tls(cloud: Cloud, people: str) -> None:
    hosts = cloud.workdir / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in cloud.hosts.items())
    )
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env.update(cloud.client_env())
    project, dataset_id, table_id = people.split(".")
    script = Path(__file__).with_name("storage_read_client.py")
    command = 'mount --bind "$1" /etc/hosts && exec "$2" "$3" --project "$4" --table "$5"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command, "sh",
         str(hosts), sys.executable, str(script), project, f"{dataset_id}.{table_id}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["read_rows"] == 3
    if output["to_arrow"] is not None:
        assert output["to_arrow"] == ["ada", "bob", "cy"]


def _https_get(cloud: Cloud, host: str, port: int, path: str, data: bytes | None = None) -> dict:
    import ssl

    url = f"https://{host}{path}" if port == 443 else f"http://{host}:{port}{path}"
    context = ssl.create_default_context(cafile=str(cloud.ca_file))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(url, data=data)
    with opener.open(request, timeout=10) as response:
        assert response.status == 200
        return json.load(response)


def test_echo_server_over_tls_and_plain_http(cloud: Cloud, client: bigquery.Client) -> None:
    over_tls = _https_get(cloud, "example.test", 443, "/some/where?x=1")
    assert over_tls == {
        "service": "echo",
        "tls": True,
        "method": "GET",
        "host": "example.test",
        "path": "/some/where?x=1",
        "body_bytes": 0,
    }
    plain = _https_get(cloud, "example.test", cloud.echo_plain_port, "/", data=b"abc")
    assert plain["tls"] is False
    assert plain["method"] == "POST"
    assert plain["body_bytes"] == 3


def test_stub_token_sets_session_user(cloud: Cloud, client: bigquery.Client) -> None:
    from google.oauth2 import service_account

    # The stub token endpoint verifies the assertion against the cloud's registered key.
    assert cloud.identities is not None
    credentials = service_account.Credentials.from_service_account_file(
        str(cloud.identities.service_account_key),
        scopes=["https://www.googleapis.com/auth/bigquery"],
    )
    agent = bigquery.Client(project=cloud.project, credentials=credentials)
    assert rows(agent, "SELECT SESSION_USER()") == [(cloud.identities.runner,)]


def test_teardown_removes_namespace_and_link(tmp_path: Path) -> None:
    python = _skip_unless_possible()
    from pyroute2 import IPRoute, netns

    with Cloud(tmp_path, python, subnet="198.19.1.0/24") as second:
        assert second.namespace in netns.listnetns()
    assert second.namespace not in netns.listnetns()
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=second.host_interface)


def test_upstream_exit_raises_and_cleans_up(tmp_path: Path) -> None:
    _skip_unless_possible()
    from pyroute2 import netns

    failing = tmp_path / "fail.sh"
    failing.write_text("#!/bin/sh\necho 'upstream exploded on purpose' >&2\nexit 3\n")
    failing.chmod(0o755)
    cloud = Cloud(tmp_path / "work", str(failing), subnet="198.19.2.0/24", startup_timeout=20)
    with pytest.raises(CloudError, match="exited with code 3(.|\n)*exploded on purpose"):
        cloud.start()
    assert cloud.namespace not in netns.listnetns()


def test_busy_subnet_is_rejected(cloud: Cloud, tmp_path: Path) -> None:
    with pytest.raises(CloudError, match="already in use"):
        Cloud(tmp_path, cloud.upstream_python).start()
