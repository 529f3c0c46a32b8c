"""`--endpoint` values as replicas: a comma list or a file of URLs names replicas;
repeated single URLs keep the openai backend's own routing."""
import pytest

from wallperf.driver.endpoints_arg import expand_endpoints
from wallperf.harness.config import ConfigError


def test_comma_list_and_file_name_replicas(tmp_path):
    f = tmp_path / "replicas.txt"
    f.write_text("# two replicas\nhttp://10.0.0.1:8000\n\nhttp://10.0.0.2:8000  # second\n")
    assert expand_endpoints(["http://a:1,http://b:2"]) == (["http://a:1", "http://b:2"], True)
    assert expand_endpoints([str(f)]) == (["http://10.0.0.1:8000", "http://10.0.0.2:8000"], True)
    assert expand_endpoints(["http://a:1", "http://b:2"]) == (["http://a:1", "http://b:2"], False)
    # One URL, however given, is no set of replicas.
    assert expand_endpoints(["http://a:1,"]) == (["http://a:1"], False)
    assert expand_endpoints(None) == (None, False)


def test_a_file_without_urls_is_refused(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="names no URL"):
        expand_endpoints([str(f)])
