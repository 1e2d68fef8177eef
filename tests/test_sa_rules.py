"""The SPAMFLOW band rules lint cleanly and fire exactly one band per verdict header."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from spamflow import sa_rules
from spamflow.replay.spamd import SpamdInstance, build_site_config, send_request

MESSAGE_TEMPLATE = (
    "Message-ID: <spamflow-rules-{index}@example.com>\r\n"
    "Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    "From: Alice <alice@example.com>\r\n"
    "To: Bob <bob@example.com>\r\n"
    "Subject: band test {index}\r\n"
    "{headers}"
    "\r\n"
    "Plain text body.\r\n"
)



def band_for_hundredths(hundredths: int) -> str:
    """Return the band rule for p = hundredths / 100, written out independently of BANDS."""
    if hundredths <= 4:
        return "SPAMFLOW_P00_04"
    if hundredths <= 34:
        return "SPAMFLOW_P05_34"
    if hundredths <= 64:
        return "SPAMFLOW_P35_64"
    if hundredths <= 94:
        return "SPAMFLOW_P65_94"
    return "SPAMFLOW_P95_100"


# Every two-decimal p the proxy can write, with the band rule it must fire.
EXPECTED_BANDS = [
    (f"{hundredths / 100:.2f}", band_for_hundredths(hundredths)) for hundredths in range(101)
]

# Header lines that must fire no SPAMFLOW rule.
NON_MATCHING_HEADERS = {
    "no header": "",
    "flow identity header": "X-Spamflow-Flow: 10.77.1.2:40211; t=1733327000; mac=00ff\r\n",
    "flow header in verdict format": "X-Spamflow-Flow: p=0.97; model=nb-10; flow=x\r\n",
    "p above one": "X-Spamflow: p=1.01; model=nb-10; flow=10.0.0.1:1234\r\n",
    "one decimal": "X-Spamflow: p=0.5; model=nb-10; flow=10.0.0.1:1234\r\n",
    "three decimals": "X-Spamflow: p=0.975; model=nb-10; flow=10.0.0.1:1234\r\n",
    "no leading zero": "X-Spamflow: p=.50; model=nb-10; flow=10.0.0.1:1234\r\n",
    "no semicolon": "X-Spamflow: p=0.50 model=nb-10\r\n",
    "text before p": "X-Spamflow: x p=0.50; model=nb-10\r\n",
    "negative p": "X-Spamflow: p=-0.50; model=nb-10\r\n",
}


def build_message(index: int, headers: str) -> bytes:
    return MESSAGE_TEMPLATE.format(index=index, headers=headers).encode("ascii")


def spamflow_symbols(spamd: SpamdInstance, message: bytes) -> list[str]:
    reply = send_request(spamd.host, spamd.port, "SYMBOLS", message)
    assert reply.status_line.endswith(" 0 EX_OK"), reply.status_line
    return [name for name in reply.symbols if name.startswith("SPAMFLOW_")]


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory):
    with SpamdInstance(tmp_path_factory.mktemp("spamd-rules")) as instance:
        yield instance


def test_lint_is_clean(tmp_path: Path) -> None:
    site = build_site_config(tmp_path / "site")
    result = subprocess.run(
        ["spamassassin", "--lint", "-L", f"--siteconfigpath={site}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


def test_lint_catches_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "73_broken.cf"
    broken.write_text("header SPAMFLOW_BROKEN X-Spamflow =~ /^p=(/\n")
    site = build_site_config(tmp_path / "site", [*sa_rules.rule_files(), broken])
    result = subprocess.run(
        ["spamassassin", "--lint", "-L", f"--siteconfigpath={site}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "SPAMFLOW_BROKEN" in result.stderr


def test_rule_files_found() -> None:
    names = [path.name for path in sa_rules.rule_files()]
    assert names == ["72_spamflow.cf"]


def test_default_scores() -> None:
    scores = sa_rules.read_scores()
    assert scores == {
        "SPAMFLOW_P00_04": -1.0,
        "SPAMFLOW_P05_34": -0.3,
        "SPAMFLOW_P35_64": 0.001,
        "SPAMFLOW_P65_94": 1.0,
        "SPAMFLOW_P95_100": 2.5,
    }


def test_scores_overridden_by_local_cf(tmp_path: Path) -> None:
    site = build_site_config(tmp_path / "site", extra_config=["score SPAMFLOW_P95_100 3.5"])
    scores = sa_rules.read_scores([*sa_rules.rule_files(), site / "local.cf"])
    assert scores["SPAMFLOW_P95_100"] == 3.5
    assert scores["SPAMFLOW_P00_04"] == -1.0


def test_every_rule_has_description() -> None:
    text = "\n".join(path.read_text() for path in sa_rules.rule_files())
    for name in sa_rules.RULE_NAMES:
        assert f"describe {name}" in " ".join(text.split()), name


@pytest.mark.parametrize(("p_text", "expected_rule"), EXPECTED_BANDS)
def test_band_rule_mirror(p_text: str, expected_rule: str) -> None:
    assert sa_rules.band_rule(float(p_text)) == expected_rule


@pytest.mark.parametrize("p", [-0.01, 1.01, float("nan")])
def test_band_rule_rejects_out_of_range(p: float) -> None:
    with pytest.raises(ValueError, match="outside 0..1"):
        sa_rules.band_rule(p)


@pytest.mark.spamd
@pytest.mark.parametrize(("p_text", "expected_rule"), EXPECTED_BANDS)
def test_band_fires_once(spamd: SpamdInstance, p_text: str, expected_rule: str) -> None:
    header = f"X-Spamflow: p={p_text}; model=nb-120; flow=10.77.1.2:40211\r\n"
    symbols = spamflow_symbols(spamd, build_message(int(p_text.replace(".", "")), header))
    assert symbols == [expected_rule]


@pytest.mark.spamd
@pytest.mark.parametrize("case", sorted(NON_MATCHING_HEADERS))
def test_no_band_fires(spamd: SpamdInstance, case: str) -> None:
    symbols = spamflow_symbols(spamd, build_message(900, NON_MATCHING_HEADERS[case]))
    assert symbols == []


@pytest.mark.spamd
def test_band_score_added(spamd: SpamdInstance) -> None:
    header = "X-Spamflow: p=0.97; model=nb-120; flow=10.77.1.2:40211\r\n"
    with_header = send_request(spamd.host, spamd.port, "CHECK", build_message(1, header))
    without_header = send_request(spamd.host, spamd.port, "CHECK", build_message(1, ""))
    # spamd prints scores with one decimal, so each side may be off by 0.05.
    assert with_header.score - without_header.score == pytest.approx(2.5, abs=0.11)
