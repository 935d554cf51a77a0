"""`python -m haystream.testing`: a fake OpenAI-compatible upstream in its own process (prints its base URL, serves
until stdin closes)."""

import argparse

from haystream.testing.fake_upstream import serve_until_stdin_closes

argparse.ArgumentParser(
    prog="python -m haystream.testing",
    description="Serve haystream's fake OpenAI-compatible upstream on a loopback port: prints its base URL, then "
    "serves until standard input closes. Behaviour per request is set by the model name, e.g. "
    "'fake?tokens=50&delay=0.02&fail_after=10'.",
).parse_args()
serve_until_stdin_closes()
