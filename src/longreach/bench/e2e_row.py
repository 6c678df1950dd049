"""One end-to-end benchmark row in a fresh interpreter: ``python -m longreach.bench.e2e_row '<job json>'``.

``bench.e2e.run_rows`` starts this once per row and repeat, so each peak RSS is the row's own; the last
line of stdout is the row as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..models import load_model
from .e2e import measure_row


def main(job: dict) -> dict:
    text = Path(job["text_file"]).read_text()
    model, tokenizer = load_model(job["model"])
    return measure_row(model, tokenizer, text, job["length"], job["spec"],
                       job["new_tokens"], job["chunk"], job["hf_generate"])


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
