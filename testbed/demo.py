"""`make demo`: run the example agent in a recorded session against the local upstream.

Starts the testbed cloud, writes a configuration that points the appliance at it, runs
`appliance run --agent-cmd "python agent.py"` with examples/agent.py as the agent user, and
prints the session's replay. Everything it creates lives in a temporary directory that is
removed at the end, so the demo leaves no store behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from testbed.cloud import Cloud

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    agent_python = os.environ.get("APPLIANCE_AGENT_PYTHON")
    if not agent_python or not Path(agent_python).exists():
        print("demo: APPLIANCE_AGENT_PYTHON must name the agent venv's python; run 'make demo'.",
              file=sys.stderr)
        return 2
    # The agent user reads its script and session files, so they live outside private homes.
    base = Path(tempfile.mkdtemp(prefix="appliance-demo-", dir="/tmp"))
    base.chmod(0o755)
    try:
        return _run(base, agent_python)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(base: Path, agent_python: str) -> int:
    with Cloud(base / "cloud") as cloud:
        config = base / "appliance.yaml"
        config.write_text(yaml.safe_dump({
            # The signing key stays in the demo directory, not in /etc/appliance.
            "store": {"path": str(base / "store"), "signing_key": str(base / "signing-key.pem")},
            "runtime_dir": str(base / "run"),
            "proxy": {"ca_dir": str(base / "ca"), "upstream_ca_file": str(cloud.ca_file)},
            "network": {"hosts": cloud.hosts},
            "agents": {"demo-agent": {
                "project": cloud.project,
                "principal": "demo-agent@demo-project.iam.gserviceaccount.com",
                # The appliance impersonates the demo principal with the testbed's key; the
                # agent itself holds only a placeholder.
                "credentials": {"source": "impersonate",
                                "file": str(cloud.identities.service_account_key),
                                "target_principal": cloud.identities.demo_agent},
            }},
            "default_agent": "demo-agent",
        }))
        workspace = base / "workspace"
        workspace.mkdir(mode=0o755)
        shutil.copy(REPO / "examples" / "agent.py", workspace / "agent.py")
        appliance = [sys.executable, "-m", "appliance"]
        path = f"{Path(agent_python).parent}:/usr/local/bin:/usr/bin:/bin"
        print("$ appliance run --agent-cmd \"python agent.py\"", flush=True)
        run = subprocess.run([*appliance, "run", "--config", str(config), "--env",
                              f"PATH={path}", "--agent-cmd", "python agent.py"],
                             cwd=workspace, capture_output=True, text=True, check=False)
        sys.stdout.write(run.stdout)
        sys.stdout.write(run.stderr)
        if run.returncode != 0:
            return run.returncode
        session_id = next(line.split()[2] for line in run.stderr.splitlines()
                          if line.startswith("appliance: session "))
        print(f"\n$ appliance sessions replay {session_id}", flush=True)
        replay = subprocess.run([*appliance, "sessions", "replay", session_id, "--config",
                                 str(config)], check=False)
        return replay.returncode


if __name__ == "__main__":
    sys.exit(main())
