"""End-to-end replay through real namespaces, spamd, tap, policy, proxy and Postfix.

One testbed serves the first three tests, in file order: the learning run first, then the
fail-open checks, which kill the tap, then the liveness checks, which kill a delay stage
and the policy service. The last tests run ``spamflow demo`` on their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from spamflow.config import LearnConfig
from spamflow.replay.daemons import DaemonError
from spamflow.replay.demo import ReplayRequest, prepare_messages
from spamflow.replay.netns import PathProfile, list_namespaces
from spamflow.replay.results import parse_delivered, smtp_canonical, split_message
from spamflow.replay.testbed import ReplayMessage, Testbed, TestbedOptions

pytestmark = [
    pytest.mark.root,
    pytest.mark.spamd,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and NFQUEUE"),
    pytest.mark.timeout(300),
]

WAIT_S = 150.0
FORGED = b"X-Spamflow: p=0.00; model=x; flow=1.2.3.4:5\n"


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    options = TestbedOptions(
        run_dir=tmp_path_factory.mktemp("replay-run"),
        prefix=f"sft-rp-{os.getpid()}",
        # Thresholds that the sample's old messages reach without Bayes or network tests,
        # and a model after 3 examples of each class, so one trains within the first run.
        learn=LearnConfig(spam_threshold=6.0, ham_threshold=1.5, retrain_every=4,
                            min_examples_per_class=3),
        spam_profile=PathProfile(ttl=128, tcp_timestamps=False, delay_ms=40.0, jitter_ms=10.0),
        ham_profile=PathProfile(ttl=64, delay_ms=5.0, jitter_ms=1.0),
        send_interval=0.02,
    )
    with Testbed(options) as bed:
        yield bed


@pytest.fixture(scope="module")
def messages():
    return prepare_messages(ReplayRequest(spam=20, ham=20, seed=3))


def _send_and_wait(testbed: Testbed, batch: list[ReplayMessage]) -> dict[str, dict]:
    records = testbed.send(batch, progress=False)
    accepted = [record["id"] for record in records if record.get("accepted")]
    assert len(accepted) == len(batch), [r.get("error") for r in records]
    assert testbed.wait_delivered(accepted, WAIT_S, progress=False), \
        testbed.postfix.log_tail()
    return {record["id"]: record for record in records}


def _body(data: bytes) -> bytes:
    return split_message(data)[1]


def test_replay_learns_and_marks_later_mail(testbed, messages):
    first, later = messages[:30], messages[30:]
    sent = _send_and_wait(testbed, first)
    trained = [o for o in testbed.observations() if o.label is not None]
    assert {o.label for o in trained} == {0, 1}, "expected spam and ham auto-learned"

    forged = ReplayMessage("f00001", later[0].name, later[0].label, FORGED + later[0].raw)
    sent.update(_send_and_wait(testbed, later + [forged]))
    delivered = testbed.delivered_files()

    for message in first + later + [forged]:
        assert message.id in delivered, f"{message.id} was accepted but not delivered"
        body_sent = _body(smtp_canonical(message.raw))
        assert _body(delivered[message.id]) == body_sent, f"{message.id} body changed"

    marked = {}
    for message in later + [forged]:
        headers = parse_delivered(delivered[message.id])
        assert headers.spam_status is not None, f"{message.id} has no X-Spam-Status"
        if headers.p is not None:
            marked[message.id] = headers
    assert len(marked) >= len(later) * 3 // 4, "too few later messages carry X-Spamflow"

    for message_id, headers in marked.items():
        rules = [test for test in headers.tests if test.startswith("SPAMFLOW_")]
        assert len(rules) == 1, f"{message_id}: {headers.spam_status}"
        assert headers.spamflow_count == 1, f"{message_id} has several X-Spamflow headers"
        assert headers.spamflow.endswith(f"flow={sent[message_id]['flow']}"), headers.spamflow
        assert headers.model is not None, f"{message_id} verdict has no model"
        assert headers.model.split("-")[-1].isdigit(), headers.model

    # The forged header is removed; any verdict left is the proxy's own.
    assert b"model=x;" not in delivered["f00001"]
    assert b"flow=1.2.3.4:5" not in delivered["f00001"]


def test_fail_open_without_tap(testbed, messages):
    testbed.daemons["tap"].kill()
    spam = next(m for m in messages if m.label == "spam")
    ham = next(m for m in messages if m.label == "ham")
    batch = [
        ReplayMessage("o00001", spam.name, "spam", spam.raw),
        ReplayMessage("o00002", ham.name, "ham", ham.raw),
        ReplayMessage("o00003", ham.name, "ham", FORGED + ham.raw),
    ]
    _send_and_wait(testbed, batch)
    delivered = testbed.delivered_files()

    for message in batch:
        data = delivered[message.id]
        headers = parse_delivered(data)
        assert headers.spam_status is not None, f"{message.id} was not scanned by spamd"
        assert not [t for t in headers.tests if t.startswith("SPAMFLOW_")], headers.tests
        assert headers.spamflow is None, f"{message.id} carries {headers.spamflow}"
        assert b"\nX-Spamflow:" not in b"\n" + split_message(data)[0]
        assert _body(data) == _body(smtp_canonical(message.raw))


def test_dead_daemons_stop_send_and_wait(testbed, messages):
    spam = next(m for m in messages if m.label == "spam")
    batch = [ReplayMessage("d00001", spam.name, "spam", spam.raw)]

    stage = testbed.topology.paths["spam"].delay_process
    stage.kill()
    stage.wait(timeout=10)
    with pytest.raises(DaemonError) as dead_stage:
        testbed.send(batch, progress=False)
    assert "delay stage of the spam path" in str(dead_stage.value)
    assert str(testbed.log_dir / "delay-spam.log") in str(dead_stage.value)
    assert "d00001" not in testbed.delivered_files()

    policy = testbed.daemons["policy"]
    policy.process.kill()
    policy.process.wait(timeout=10)
    with pytest.raises(DaemonError) as dead_policy:
        testbed.wait_delivered(["d00001"], WAIT_S, progress=False)
    assert str(dead_policy.value).startswith("policy (pid ")
    assert str(policy.log_path) in str(dead_policy.value)


def test_demo_command_writes_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "spamflow", "demo", "--spam", "4", "--ham", "4",
         "--run-dir", str(run_dir), "--prefix", f"sft-rp-{os.getpid()}-d", "--no-progress"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SA-only accuracy" in result.stdout
    assert "accuracy with SPAMFLOW" in result.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sent"] == 8
    assert summary["delivered"] == 8
    assert summary["observed"] == 8
    assert summary["complete"] is True

    lines = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    assert {line["label"] for line in lines} == {"spam", "ham"}
    for line in lines:
        assert set(line) >= {"id", "label", "flow", "delivered", "score", "base_score", "p",
                             "model", "spamflow_rules"}
        assert line["flow"].startswith("198.18.")
    for name in ("tap.log", "policy.log", "proxy.log", "maillog", "delay-spam.log"):
        assert (run_dir / "logs" / name).stat().st_size > 0, name
    assert "spamflow.replay.delay:" in (run_dir / "logs" / "delay-spam.log").read_text()
    assert "spamflow.replay.sender:" in (run_dir / "logs" / "sender-ham.log").read_text()
    assert (run_dir / "summary.txt").read_text().startswith("messages sent")
    assert len(list((run_dir / "Maildir" / "new").iterdir())) == 8


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_demo_interrupt_writes_partial_results(tmp_path):
    # A shell starts background jobs with SIGINT ignored; the demo must still stop on it.
    prefix = f"sft-rp-{os.getpid()}-i"
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "spamflow", "demo", "--spam", "30", "--ham", "30",
         "--run-dir", str(run_dir), "--prefix", prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ignore_sigint)
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            if f"testbed {prefix} ready" in line:
                break
        else:
            pytest.fail("demo ended before its testbed was ready:\n" + "".join(lines[-30:]))
        # Let some messages go through before the interrupt.
        deadline = time.monotonic() + 30
        while not (run_dir / "logs" / "sender-spam.log").exists():
            assert time.monotonic() < deadline, "the demo did not start sending"
            time.sleep(0.1)
        time.sleep(3.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130, stderr[-3000:]
    assert f"interrupted: removed testbed {prefix}; partial results and logs are in " \
        f"{run_dir}" in stderr
    assert "Traceback" not in stderr
    assert "\r" not in stderr, "progress bar written to a stderr that is not a terminal"
    assert [name for name in list_namespaces() if name.startswith(prefix + "-")] == []

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] is False
    assert summary["stopped"] == "interrupted"
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == summary["sent"]
    assert (run_dir / "summary.txt").read_text().startswith("INCOMPLETE: the run was stopped")
    assert (run_dir / "logs" / "proxy.log").stat().st_size > 0
