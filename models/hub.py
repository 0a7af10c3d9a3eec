"""`--model org/name`: a Hugging Face Hub id resolved to its snapshot directory, as transformers users expect.

The local cache comes first (huggingface_hub's layout under HF_HUB_CACHE / HF_HOME); offline mode
(HF_HUB_OFFLINE=1, or transformers' TRANSFORMERS_OFFLINE=1) is respected, so a model that is not cached is a
one-line error naming the cache and the command that fills it. Online, only what graphllm reads is downloaded
(config, safetensors weights and their index, tokenizer files). A preset name or an existing path is returned
unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from graphllm.errors import GraphllmError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""org/name as the Hub spells repository ids (no leading dot or slash, one slash)."""
ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                  "tokenizer*", "special_tokens_map.json", "*.model", "vocab.*", "merges.txt", "chat_template.*"]
"""What a download fetches: graphllm reads safetensors only, so .bin/.pt/.gguf weights are never pulled."""


def is_hub_id(name: str) -> bool:
    """True for `org/name` that is not also an existing local path."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model(name: str, presets: tuple[str, ...] = ()) -> str:
    """The local directory of a Hub id (from the cache, or downloaded when online); anything else unchanged."""
    if name in presets or not is_hub_id(name):
        return name
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # transformers depends on huggingface_hub, so this is a broken install
        raise GraphllmError(f"--model {name} looks like a Hugging Face Hub id, but huggingface_hub is not installed; "
                            "pip install huggingface_hub, or pass a local directory") from None
    cache = constants.HF_HUB_CACHE
    try:
        return snapshot_download(name, local_files_only=True, allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError:
        pass
    except Exception as e:  # a malformed id or a damaged cache entry
        raise GraphllmError(f"--model {name}: the Hugging Face cache at {cache} cannot be read ({e}); pass a local "
                            "directory instead") from None
    if offline():
        raise GraphllmError(f"--model {name} is not in the Hugging Face cache at {cache} and offline mode is on "
                            f"(HF_HUB_OFFLINE): run `hf download {name}` where the Hub is reachable, or pass a "
                            "local directory")
    try:
        return snapshot_download(name, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # no network, no such repository, a gated model without a token
        raise GraphllmError(f"--model {name} is not in the Hugging Face cache at {cache} and downloading it failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); run "
                            f"`hf download {name}` or pass a local directory") from None
