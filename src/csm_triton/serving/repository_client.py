"""Triton's model repository API as the model supervisor (supervisor.py) calls it: the
index of models and their states, a model's config, unload and load, each carrying the
model-control key's headers.

Kept apart from the supervisor's decisions so that its tests hand it a fake with these
five methods, and because the connection's lifetime matters on its own: tritonclient's
HTTP client is made in the thread that uses it (its gevent connections belong to one
thread) and closed after every round (Triton 2.51 waits on SIGTERM for every open HTTP
connection, an idle keep-alive one included, for its whole exit timeout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RepositoryClient"]


@dataclass
class RepositoryClient:
    """The few repository calls the supervisor makes, over one lazily made connection."""

    url: str
    load_timeout_s: float
    headers: dict[str, str] | None = None  # the model-control key's
    _client: object = field(default=None, init=False)

    def _http(self):
        if self._client is None:
            import tritonclient.http as http

            self._client = http.InferenceServerClient(
                self.url, connection_timeout=5.0, network_timeout=self.load_timeout_s
            )
        return self._client

    def states(self) -> dict[str, str]:
        return {m["name"]: m.get("state", "") for m in self._http().get_model_repository_index(headers=self.headers)}

    def config(self, model: str) -> dict:
        return self._http().get_model_config(model)

    def unload(self, model: str) -> None:
        self._http().unload_model(model, headers=self.headers)

    def load(self, model: str) -> None:
        self._http().load_model(model, headers=self.headers)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
