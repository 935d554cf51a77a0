"""`python -m haystream.testing`: a fake OpenAI-compatible upstream in its own process (prints its base URL, serves
until stdin closes)."""

from haystream.testing.fake_upstream import serve_until_stdin_closes

serve_until_stdin_closes()
