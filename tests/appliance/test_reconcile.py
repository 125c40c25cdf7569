"""Tests of reconcile's comparison of BigQuery's job listing with a recording."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.commands.reconcile import RecordedJob, Report, compare, job_summary

KEY, VALUE = "appliance-session", "20261204t202016z-78626f46"


def listed(job_id: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"jobReference": {"projectId": "p", "jobId": job_id, "location": "US"},
            "configuration": {"jobType": "QUERY", "labels": labels or {},
                              "query": {"query": "SELECT " + "x" * 300}},
            "statistics": {"creationTime": "1796415616000"}, "state": "DONE",
            "user_email": "agent@p.iam.gserviceaccount.com"}


def report() -> Report:
    return Report("s", "agent@p.iam.gserviceaccount.com", ["p"], {}, {KEY: VALUE})


@pytest.mark.parametrize(("jobs", "recorded", "matched", "missing", "unlisted", "others"), [
    ([listed("a", {KEY: VALUE})], ["a"], ["a"], [], [], 0),
    ([listed("a", {KEY: VALUE}), listed("b", {KEY: VALUE})], ["a"], ["a"], ["b"], [], 0),
    ([listed("a"), listed("b", {"team": "x"})], [], [], ["a", "b"], [], 0),
    ([listed("a", {KEY: "another-session"})], [], [], [], [], 1),
    ([], ["a"], [], [], ["a"], 0),
], ids=["match", "labelled-extra", "unlabelled-extra", "other-session", "recorded-unlisted"])
def test_compare_sorts_jobs(jobs: list[dict[str, Any]], recorded: list[str],
                            matched: list[str], missing: list[str], unlisted: list[str],
                            others: int) -> None:
    result = report()

    left = compare(result, jobs, [RecordedJob("p", "US", job) for job in recorded], KEY, VALUE)

    assert result.matched == matched
    assert [job["job_id"] for job in result.missing_from_recording] == missing
    assert [job.job_id for job in left] == unlisted
    assert result.other_sessions == others


def test_without_label_key_every_job_counts() -> None:
    result = report()

    compare(result, [listed("a", {KEY: "another-session"})], [], None, VALUE)

    assert [job["job_id"] for job in result.missing_from_recording] == ["a"]


def test_job_summary_cuts_query_and_dates() -> None:
    summary = job_summary(listed("a"))

    assert len(summary["query"]) == 200
    assert summary["created_at"] == "2026-12-04T20:20:16.000Z"
    assert summary["state"] == "DONE"


def test_report_matches_only_without_differences() -> None:
    result = report()
    result.unknown_to_bigquery.append({"job_id": "a"})

    assert result.match is False
    assert result.as_dict()["match"] is False
