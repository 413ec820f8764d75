"""Entrypoint for `ray job submit`: run the job a YAML config describes on the cluster it is started in.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/run.py --config jobs/configs/default.yaml

Keys of the config are the CLI flags (see `forvalue-ray value --help`) plus `command: value|sketch|score`.
The resolved config is written next to the output as config.resolved.yaml.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, when not installed

from forvalue_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    sys.exit(main(["run", "--config", parser.parse_args().config]))
