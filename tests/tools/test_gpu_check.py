"""wallperf.tools.gpu_check's flags: a bad --duration is argparse's one line, exit 2,
before anything is measured or written."""
import pytest

from wallperf.tools import gpu_check


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0", "ten"])
def test_a_duration_that_is_not_a_finite_positive_number_is_refused(value, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--out", str(out), "--duration", value, "--skip-tests"])
    assert info.value.code == 2
    assert "--duration" in capsys.readouterr().err
    assert not out.exists()
