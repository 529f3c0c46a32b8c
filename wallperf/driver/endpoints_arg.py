"""`--endpoint` as replicas: `--endpoint URL1,URL2,...` or `--endpoint FILE` (one URL
a line, `#` comments) names the replicas of one system. Given that way, the run
routes by least outstanding requests over them, each request staying on its
replica (sut.backends.replicas); repeated `--endpoint URL` options keep the
openai backend's own routing with retries on the next endpoint."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from wallperf.harness.config import ConfigError
from wallperf.sut.backends.replicas import REPLICAS


def expand_endpoints(values: list[str] | None) -> tuple[list[str] | None, bool]:
    """(the URLs, whether any value named replicas as a comma list or a file)."""
    if not values:
        return values, False
    urls, replicas = [], False
    for value in values:
        path = Path(value)
        if "://" not in value and path.is_file():
            lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            found = [ln for ln in lines if ln]
            if not found:
                raise ConfigError(path, None, "the --endpoint file names no URL; write one URL a line")
            urls += found
            replicas = True
        elif "," in value:
            urls += [u.strip() for u in value.split(",") if u.strip()]
            replicas = True
        else:
            urls.append(value)
    return urls, replicas and len(urls) > 1


def as_replicas(resolved):
    """The resolved run with its endpoints routed as replicas (sut.backends.create reads `routing`)."""
    openai = dataclasses.replace(resolved.run.openai, routing=REPLICAS)
    return dataclasses.replace(resolved, run=dataclasses.replace(resolved.run, openai=openai))


def resolve_with_replicas(args):
    """`wallperf run ARGS` resolved (wallperf.driver.run_args), its --endpoint values expanded:
    named as replicas, the run routes over them as replicas."""
    from wallperf.driver.run_args import resolve_run_args

    args.endpoint, replicas = expand_endpoints(args.endpoint)
    resolved = resolve_run_args(args)
    return as_replicas(resolved) if replicas else resolved
