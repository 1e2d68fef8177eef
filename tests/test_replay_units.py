"""Unit tests of the replay testbed's pieces that need neither root nor daemons."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import tomllib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from spamflow.config import LearnConfig, load_config
from spamflow.replay.corpus import (CorpusError, IndexEntry, iter_messages, load_messages,
                                    read_index, select_entries, strip_mbox_from_line)
from spamflow.replay.delay import DelayLine
from spamflow.replay.netns import parse_netns_list, stop_process
from spamflow.replay.postfix import deliver_script, main_cf, master_cf
from spamflow.replay.runlock import PrefixLock, TestbedBusyError
from spamflow.replay.results import (build_results, format_table, parse_delivered,
                                     smtp_canonical, split_message, summarize)
from spamflow.replay.sender import to_crlf
from spamflow.replay.spamd import pick_free_port
from spamflow.replay.testbed import ReplayMessage, TestbedOptions, config_toml, interleave


# -- corpus ------------------------------------------------------------------------------

def test_sample_has_200_of_each_label():
    messages = list(iter_messages(verify_md5=True))
    counts = Counter(message.label for message in messages)
    assert counts == {"spam": 200, "ham": 200}
    assert all(not message.raw.startswith(b"From ") for message in messages)
    assert all(b"\n\n" in message.raw for message in messages)


def test_sample_index_matches_archive_sizes():
    entries = read_index(Path(__file__).parents[1] / "tools/replay/sample/index.tsv")
    assert len(entries) == 400
    assert max(entry.size for entry in entries) <= 200_000
    assert {entry.group for entry in entries} == {
        "easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"}


def test_strip_mbox_from_line():
    raw = b"From someone@example.com  Tue Aug  6 11:51:02 2002\nSubject: x\n\nbody\n"
    assert strip_mbox_from_line(raw) == b"Subject: x\n\nbody\n"
    assert strip_mbox_from_line(b"Subject: From here\n\n") == b"Subject: From here\n\n"


def _entries() -> list[IndexEntry]:
    return [IndexEntry(f"g/{i}", "g", "spam" if i % 2 else "ham", "", 100 * i)
            for i in range(1, 41)]


def test_select_entries_seeded_is_repeatable():
    first = select_entries(_entries(), spam=5, ham=5, seed=7)
    second = select_entries(_entries(), spam=5, ham=5, seed=7)
    other = select_entries(_entries(), spam=5, ham=5, seed=8)
    assert first == second
    assert first != other
    assert Counter(entry.label for entry in first) == {"spam": 5, "ham": 5}


def test_select_entries_skips_large_messages():
    chosen = select_entries(_entries(), spam=None, ham=None, max_bytes=1000)
    assert [entry.size for entry in chosen] == [100 * i for i in range(1, 11)]


def test_select_entries_rejects_too_many():
    with pytest.raises(CorpusError, match="only 20 spam"):
        select_entries(_entries(), spam=21, ham=0)


def _write_corpus(directory: Path, messages: dict[str, tuple[str, bytes]]) -> None:
    """Write a corpus in the shared SpamAssassin corpus layout."""
    lines = ["path_in_tarball\tgroup\tlabel\tbytes\treceived_headers\tmd5\tmd5_matches_filename"]
    with tarfile.open(directory / "corpus.tar.xz", "w:xz") as tar:
        for name, (label, raw) in messages.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
            md5 = hashlib.md5(raw).hexdigest()
            lines.append(f"{name}\t{name.split('/')[0]}\t{label}\t{len(raw)}\t0\t{md5}\tyes")
    (directory / "index.tsv").write_text("\n".join(lines) + "\n")


def test_load_messages_from_corpus_layout(tmp_path):
    _write_corpus(tmp_path, {
        "spam-1/a.txt": ("spam", b"From x  Mon\nSubject: buy\n\nnow\n"),
        "easy-ham-1/b.txt": ("ham", b"From y  Tue\nSubject: hi\n\nthere\n"),
        "easy-ham-1/c.txt": ("ham", b"Subject: no from line\n\nok\n"),
    })
    messages = load_messages(tmp_path, spam=1, ham=1)
    assert [(m.name, m.label) for m in messages] == [
        ("spam-1/a.txt", "spam"), ("easy-ham-1/b.txt", "ham")]
    assert messages[0].raw == b"Subject: buy\n\nnow\n"
    assert messages[1].raw == b"Subject: hi\n\nthere\n"


def test_iter_messages_detects_md5_mismatch(tmp_path):
    _write_corpus(tmp_path, {"spam-1/a.txt": ("spam", b"Subject: a\n\nb\n")})
    index = (tmp_path / "index.tsv").read_text().replace(
        hashlib.md5(b"Subject: a\n\nb\n").hexdigest(), "0" * 32)
    (tmp_path / "index.tsv").write_text(index)
    with pytest.raises(CorpusError, match="md5"):
        list(iter_messages(tmp_path, verify_md5=True))


def test_read_index_rejects_unknown_label(tmp_path):
    (tmp_path / "index.tsv").write_text("name\tgroup\tlabel\tmd5\tbytes\na\tg\tmaybe\t\t3\n")
    with pytest.raises(CorpusError, match="invalid line 2"):
        read_index(tmp_path / "index.tsv")


def test_read_index_rejects_bad_size(tmp_path):
    (tmp_path / "index.tsv").write_text("name\tgroup\tlabel\tmd5\tbytes\na\tg\tham\t\t3k\n")
    with pytest.raises(CorpusError, match="invalid line 2"):
        read_index(tmp_path / "index.tsv")


# -- generated configuration ---------------------------------------------------------------

def test_main_cf_settings(tmp_path):
    text = main_cf(tmp_path, domain="spamflow.test")
    settings = dict(line.split(" = ", 1) for line in text.splitlines() if " = " in line)
    assert settings["queue_directory"] == str(tmp_path / "spool")
    assert settings["data_directory"] == str(tmp_path / "data")
    assert settings["maillog_file"] == str(tmp_path / "log" / "maillog")
    assert settings["maillog_file"].startswith(settings["maillog_file_prefixes"])
    assert settings["inet_interfaces"] == "all"
    assert settings["inet_protocols"] == "ipv4"
    assert settings["transport_maps"] == "inline:{ spamflow.test=spamflow: }"
    assert settings["smtpd_data_restrictions"] == "check_policy_service inet:127.0.0.1:10040"
    assert settings["smtpd_policy_service_default_action"] == "DUNNO"
    assert settings["spamflow_destination_recipient_limit"] == "1"
    assert int(settings["line_length_limit"]) >= 1_000_000


def test_main_cf_without_policy_service(tmp_path):
    text = main_cf(tmp_path, policy_service=None)
    assert "check_policy_service" not in text


def test_master_cf_services():
    text = master_cf(Path("/var/tmp/x/deliver.sh"), pipe_concurrency=3)
    rows = [line.split() for line in text.splitlines() if line and not line[0] in "# "]
    services = {(row[0], row[1]): row for row in rows}
    assert services[("smtp", "inet")][4] == "n"
    assert services[("postlog", "unix-dgram")][7] == "postlogd"
    assert services[("spamflow", "unix")][6] == "3"
    assert all(row[4] == "n" for row in rows), "every service must run without chroot"
    assert "user=nobody argv=/var/tmp/x/deliver.sh ${user}" in text


def test_deliver_script_syntax(tmp_path):
    script = tmp_path / "deliver.sh"
    script.write_text(deliver_script(tmp_path / "Maildir", spamc_port=7830))
    assert "/usr/bin/spamc -d 127.0.0.1 -p 7830" in script.read_text()
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not os.path.exists("/usr/bin/spamc"), reason="spamc is not installed")
def test_deliver_script_falls_back_unscanned(tmp_path):
    maildir = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    script = tmp_path / "deliver.sh"
    script.write_text(deliver_script(maildir, spamc_port=pick_free_port(), spamc_timeout=5))
    message = b"Subject: test\n\nline one\n"

    result = subprocess.run(["sh", str(script), "m00007"], input=message,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (maildir / "new" / "m00007").read_bytes() == message
    assert list((maildir / "tmp").iterdir()) == []


def test_deliver_script_rejects_bad_local_part(tmp_path):
    script = tmp_path / "deliver.sh"
    script.write_text(deliver_script(tmp_path / "Maildir"))
    for name in ("../x", ".hidden", "a b", ""):
        result = subprocess.run(["sh", str(script), name], input=b"", capture_output=True)
        assert result.returncode == 65, name


def test_config_toml_round_trip(tmp_path):
    options = TestbedOptions(run_dir=tmp_path, tap_queue=9, learn=LearnConfig(
        spam_threshold=7, ham_threshold=1.5, retrain_every=4, min_examples_per_class=3))
    path = tmp_path / "spamflow.toml"
    path.write_text(config_toml(options, "127.0.0.1:4000", Path("/var/tmp/t.sock"),
                                tmp_path / "flow.key"))
    config = load_config(path)
    assert config.proxy.spamd == "127.0.0.1:4000"
    assert config.proxy.tap_socket == "/var/tmp/t.sock"
    assert config.proxy.db == str(tmp_path.resolve() / "examples.sqlite")
    assert config.policy.flow_key_file == str(tmp_path / "flow.key")
    assert config.tap.queue == 9
    assert config.learn.spam_threshold == 7.0
    assert config.learn.ham_threshold == 1.5
    assert config.learn.retrain_every == 4
    assert config.learn.min_examples_per_class == 3
    assert config.learn == LearnConfig(spam_threshold=7.0, ham_threshold=1.5, retrain_every=4,
                                       min_examples_per_class=3)
    assert tomllib.loads(path.read_text())["proxy"]["trusted_mta"] == ["127.0.0.1"]


def test_interleave_is_seeded_and_mixed():
    messages = [ReplayMessage(str(i), str(i), "spam" if i < 10 else "ham", b"")
                for i in range(20)]
    first = [m.id for m in interleave(messages, 5)]
    assert first == [m.id for m in interleave(messages, 5)]
    assert sorted(first) == sorted(m.id for m in messages)
    labels = [m.label for m in interleave(messages, 5)]
    assert labels[:10] != ["spam"] * 10


# -- delay line and sender -------------------------------------------------------------------

def test_delay_line_bounds_and_order():
    line = DelayLine(delay_ms=50, jitter_ms=20, seed=1)
    previous = float("-inf")
    for step in range(1000):
        now = step * 0.001
        release = line.release_time(now)
        assert release >= previous
        assert release <= now + 0.070 + 1e-9
        previous = release
    # Without the order constraint no packet leaves earlier than delay - jitter.
    assert DelayLine(50, 20, seed=2).release_time(10.0) >= 10.030


def test_delay_line_rejects_negative():
    with pytest.raises(ValueError, match="must be >= 0"):
        DelayLine(-1, 0)


def test_to_crlf():
    assert to_crlf(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n"
    assert to_crlf(b"lone\rcr\n") == b"lone\rcr\r\n"


# -- results ---------------------------------------------------------------------------------

DELIVERED = (
    b"X-Spam-Status: Yes, score=7.4 required=5.0 tests=RDNS_NONE,\n"
    b"\tSPAMFLOW_P95_100 autolearn=disabled version=4.0.1\n"
    b"X-Spamflow: p=0.97; model=nb-12; flow=198.18.1.2:4000\n"
    b"Subject: x\n\nbody\n"
)


def test_parse_delivered_folded_tests():
    headers = parse_delivered(DELIVERED)
    assert headers.is_spam is True
    assert headers.score == 7.4
    assert headers.tests == ["RDNS_NONE", "SPAMFLOW_P95_100"]
    assert headers.p == 0.97
    assert headers.model == "nb-12"
    assert headers.spamflow_count == 1


def test_parse_delivered_without_headers():
    headers = parse_delivered(b"Subject: x\n\nbody\n")
    assert headers.is_spam is None
    assert headers.tests == []
    assert headers.p is None


def test_split_and_canonical_body():
    assert split_message(b"A: b\n\nbody\n") == (b"A: b\n\n", b"body\n")
    assert smtp_canonical(b"A: b\r\n\r\nno newline") == b"A: b\n\nno newline\n"


def test_build_results_and_summary():
    sent = [
        {"id": "m1", "name": "s1", "label": "spam", "flow": "198.18.1.2:4000", "accepted": True},
        {"id": "m2", "name": "h1", "label": "ham", "flow": "198.18.2.2:4001", "accepted": True},
        {"id": "m3", "name": "h2", "label": "ham", "flow": "198.18.2.2:4002", "accepted": False},
    ]
    delivered = {
        "m1": DELIVERED,
        "m2": b"X-Spam-Status: Yes, score=5.5 required=5.0 tests=X autolearn=no\n\nb\n",
    }
    observations = [
        SimpleNamespace(flow="198.18.1.2:4000", score=7.4, base_score=4.9, threshold=5.0,
                        label=None),
        SimpleNamespace(flow="198.18.2.2:4001", score=5.5, base_score=5.5, threshold=5.0,
                        label=0),
    ]
    results = build_results(sent, delivered, observations)
    assert [r.delivered for r in results] == [True, True, False]
    assert results[0].spamflow_rules == ["SPAMFLOW_P95_100"]
    assert results[0].base_score == 4.9

    summary = summarize(results)
    assert summary["sent"] == 3
    assert summary["accepted"] == 2
    assert summary["delivered"] == 2
    assert summary["auto_learned"] == 1
    assert summary["auto_learned_ham"] == 1
    # SA alone: spam 4.9 < 5 is wrong, ham 5.5 >= 5 is wrong.
    assert summary["sa_only_accuracy"] == 0.0
    # With SPAMFLOW: spam Yes is right, ham Yes is wrong.
    assert summary["with_spamflow_accuracy"] == 0.5
    assert summary["with_verdict"] == 1
    assert summary["with_spamflow_rule"] == 1

    table = format_table(summary)
    assert "SA-only accuracy" in table
    assert "0.0% of 2" in table
    assert "50.0% of 2" in table


def test_stop_process_terminates():
    process = subprocess.Popen(["sleep", "30"])
    stop_process(process, "sleep")
    assert process.returncode == -signal.SIGTERM


def test_stop_process_kills_after_timeout():
    code = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    stop_process(process, "SIGTERM ignorer", timeout=0.5)
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL


def test_demo_rejects_unknown_model_kind(capsys):
    from spamflow.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--model-kind", "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_demo_rejects_invalid_prefix(capsys):
    from spamflow.cli import build_parser

    for prefix in ("bad prefix!", "-lead", "", "x" * 25, "a/b"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["demo", f"--prefix={prefix}"])
        assert exit_info.value.code == 2, prefix
        assert f"invalid testbed prefix {prefix!r}" in capsys.readouterr().err


def test_demo_accepts_valid_prefix():
    from spamflow.cli import build_parser

    for prefix in ("sfdemo", "sft-rp-32768-d", "A_1", "x" * 24):
        assert build_parser().parse_args(["demo", "--prefix", prefix]).prefix == prefix


def test_parse_netns_list_keeps_spaces():
    output = "bad prefix!-spam (id: 3)\nsfdemo-srv (id: 0)\nplain\n\n"
    assert parse_netns_list(output) == ["bad prefix!-spam", "sfdemo-srv", "plain"]


def test_prefix_lock_rejects_second_owner(tmp_path):
    first = PrefixLock("sft-unit", tmp_path)
    first.acquire()
    try:
        with pytest.raises(TestbedBusyError) as busy:
            PrefixLock("sft-unit", tmp_path).acquire()
        assert "'sft-unit'" in str(busy.value)
        assert f"pid {os.getpid()}" in str(busy.value)
        assert "--prefix" in str(busy.value)
        other = PrefixLock("sft-other", tmp_path)
        other.acquire()
        assert other.held
        other.release()
    finally:
        first.release()
    again = PrefixLock("sft-unit", tmp_path)
    again.acquire()
    assert again.held
    again.release()
    assert not again.held


def test_progress_hidden_without_terminal():
    from spamflow.replay.cli import progress_wanted

    assert not progress_wanted(False, io.StringIO())
    primary, secondary = os.openpty()
    with open(secondary, "w", closefd=True) as terminal:
        assert progress_wanted(False, terminal)
        assert not progress_wanted(True, terminal)
    os.close(primary)


def test_sender_log_has_module_name():
    result = subprocess.run([sys.executable, "-m", "spamflow.replay.sender"], input="",
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "spamflow.replay.sender: sent 0 jobs" in result.stderr
    assert "__main__" not in result.stderr


@pytest.mark.root
@pytest.mark.parametrize("options, message", [
    (["--min-examples", "0"], "learn.min_examples_per_class 0"),
    (["--retrain-every", "0"], "learn.retrain_every 0"),
    (["--spam-threshold", "1", "--ham-threshold", "2"], "learn.ham_threshold 2.0"),
])
def test_demo_rejects_learning_options(options, message, tmp_path, capsys):
    from spamflow.cli import main

    run_dir = tmp_path / "run"
    status = main(["demo", "--run-dir", str(run_dir), "--no-progress", *options])

    assert status == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize("returncode, text", [
    (0, "exited with status 0"),
    (3, "exited with status 3"),
    (-9, "was killed by signal 9 (SIGKILL)"),
    (-15, "was killed by signal 15 (SIGTERM)"),
    (-200, "was killed by signal 200"),
])
def test_describe_exit(returncode, text):
    from spamflow.replay.daemons import describe_exit

    assert describe_exit(returncode) == text
