#!/usr/bin/env python3
"""
The proxy's memory around one big upload: a mock upstream holds the files, the
proxy pins them (``files: {upstream: files}``), and the official ``openai`` SDK
uploads ``--mb`` megabytes of random bytes with ``files.create``, then reads them
back with ``files.content``.  The proxy's VmRSS and VmHWM (from /proc, in KiB)
are printed before, after the upload and after the download.  A proxy that
spools the body to a temporary file and streams it grows by far less than the
upload; one that holds it grows by at least its size.

    python bench/upload_memory.py
    python bench/upload_memory.py --mb 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import openai

from llmproxy.testing.processes import Mock, Proxy, proc_status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=20, help="upload size in MiB (default 20)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmproxy-upload-") as tmp:
        work = Path(tmp)
        mock = Mock(work, "files")
        proxy: Proxy | None = None
        try:
            proxy = Proxy(
                work,
                f"upstreams:\n  files: {{base_url: '{mock.base_url}'}}\n"
                "models: {}\nfiles: {upstream: files}\ncache: {backend: 'off'}\n",
            )
            client = openai.OpenAI(
                api_key="unused", base_url=proxy.base_url, max_retries=0, timeout=300
            )
            pid = proxy.process.pid
            warm = client.files.create(file=("warm.jsonl", os.urandom(500_000)), purpose="batch")
            client.files.content(warm.id).read()
            figures: dict[str, object] = {"upload_mib": args.mb}
            before, mock_before = proc_status(pid), proc_status(mock.process.pid)
            data = os.urandom(args.mb * 1024 * 1024)
            uploaded = client.files.create(file=("big.jsonl", data), purpose="batch")
            after_upload, mock_after = proc_status(pid), proc_status(mock.process.pid)
            got = client.files.content(uploaded.id).read()
            after_download = proc_status(pid)
            if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
                raise SystemExit("the downloaded file differs from the upload")
            for label, status in (
                ("before", before),
                ("after_upload", after_upload),
                ("after_download", after_download),
            ):
                figures[f"rss_{label}_kib"] = status.get("VmRSS")
                figures[f"hwm_{label}_kib"] = status.get("VmHWM")
            if before and after_upload and after_download:
                figures["upload_rss_growth_kib"] = after_upload["VmRSS"] - before["VmRSS"]
                figures["upload_peak_growth_kib"] = after_upload["VmHWM"] - before["VmHWM"]
                figures["download_peak_growth_kib"] = after_download["VmHWM"] - before["VmHWM"]
            if mock_before and mock_after:
                # The control: the mock holds each file whole, so it grows by the upload.
                figures["mock_peak_growth_kib"] = mock_after["VmHWM"] - mock_before["VmHWM"]
            print(json.dumps(figures, indent=2))
        finally:
            if proxy is not None:
                proxy.stop()
            mock.stop()


if __name__ == "__main__":
    main()
