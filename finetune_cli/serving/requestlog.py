"""`ftune serve --log-requests DIR`: each finished request appended to DIR/requests.jsonl, and the ratings people
give replies (POST /v1/feedback) to DIR/feedback.jsonl, for `ftune feedback` to turn into training data.

The folder is ftune's (its .ftune marker says `serve-log`) and one server's at a time (the folder's flock, held
while serving); a restarted server appends to it. Each line is written whole, in one write, from a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from finetune_cli import rundir
from finetune_cli.data.feedback import FEEDBACK, KIND, REQUESTS, log_lines  # the log, as `ftune feedback` reads it
from finetune_cli.errors import FtuneError
from finetune_cli.serving.engine import ApiError

FEEDBACK_BYTES = 16 * 1024  # the largest POST /v1/feedback body
COMMENT_CHARS = 2000


class Feedback(BaseModel):
    """A rating of one reply, or the choice between two replies to the same messages."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(min_length=1, max_length=200)
    rating: Literal[1, -1] | None = None
    better_than: StrictStr | None = Field(None, min_length=1, max_length=200)
    comment: StrictStr | None = Field(None, max_length=COMMENT_CHARS)

    @field_validator("rating", mode="before")
    @classmethod
    def _integer(cls, value):
        if value is not None and type(value) is not int:  # JSON's true or 1.0 is not a rating
            raise ValueError("Input should be 1 or -1")
        return value

    def checked(self) -> Feedback:
        if (self.rating is None) == (self.better_than is None):
            raise ApiError(400, 'give either "rating" (1 or -1) or "better_than" (another completion id)', "rating")
        if self.better_than == self.id:
            raise ApiError(400, "better_than: a reply cannot be better than itself", "better_than")
        return self


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def prompt_key(record: dict) -> str:
    """What two replies must share to be compared: the endpoint and the messages (or prompt) they answer."""
    asked = record.get("messages", record.get("prompt"))
    return hashlib.sha256(json.dumps([record.get("endpoint"), asked], sort_keys=True).encode()).hexdigest()


def check_folder(folder: Path) -> None:
    """Refuse, before the server starts, a log folder that is a file, a protected folder, or one holding files of
    something else (only a folder an earlier `--log-requests` wrote, or a new or empty one, is appended to)."""
    key = "--log-requests"
    why = rundir._protected(folder)
    if why:
        raise FtuneError(f"{key}: {folder} is {why}; give the log a folder of its own, e.g. logs/serve")
    if folder.exists() and not folder.is_dir():
        raise FtuneError(f"{key}: {folder} is a file, not a folder; give a folder (it is created if missing)")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    kind = (rundir.read_marker(folder) or {}).get("kind")
    if kind != KIND:
        what = f"a {kind} output of ftune" if kind else "files ftune did not write"
        raise FtuneError(
            f"{key}: {folder} holds {what}; give a new or empty folder, or one an earlier `ftune serve "
            f"--log-requests` wrote"
        )
    for name in (REQUESTS, FEEDBACK):
        path = folder / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise FtuneError(f"{key}: {path} is not a plain file; ftune appends only to the files it wrote there")


class RequestLog:
    """The open log: the ids of the logged replies (to check feedback against) and the two files, appended to."""

    def __init__(self, folder: Path, warn=lambda msg: None):
        self.folder = folder
        self.lock = threading.Lock()
        self.replies: dict[str, str] = {}  # completion id -> prompt_key
        rundir.mark(folder, KIND, [REQUESTS, FEEDBACK])
        for name in (REQUESTS, FEEDBACK):
            _repair(folder / name, warn)
        if (folder / REQUESTS).is_file():
            for where, record in log_lines(folder / REQUESTS, Counter()):  # whole lines only, after _repair
                if not isinstance(record.get("id"), str):
                    raise FtuneError(f"{where}: no completion id; this is not a line ftune wrote")
                self.replies[record["id"]] = prompt_key(record)

    def _append(self, name: str, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.folder / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def add(self, record: dict) -> None:
        """Log one finished request (called from a worker thread)."""
        with self.lock:
            self._append(REQUESTS, record)
            self.replies[record["id"]] = prompt_key(record)

    def feedback(self, body: Feedback) -> dict:
        """Store a rating or a choice; an unknown reply is a 404, replies to different messages a 400."""
        body.checked()
        with self.lock:
            for field, reply in (("id", body.id), ("better_than", body.better_than)):
                if reply is not None and reply not in self.replies:
                    raise ApiError(404, f"{field}: no logged reply has the id {reply!r}", field, code="reply_not_found")
            if body.better_than is not None and self.replies[body.id] != self.replies[body.better_than]:
                raise ApiError(
                    400, "better_than: the two replies answer different messages; compare replies to the same "
                    "conversation", "better_than",
                )  # fmt: skip
            record = {"time": now(), **body.model_dump(exclude_none=True)}
            self._append(FEEDBACK, record)
        return {"object": "feedback", "id": body.id}


def _repair(path: Path, warn) -> None:
    """A server stopped in the middle of a write leaves a last line without its newline: drop that part (ftune wrote
    it), so the next line starts on a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    warn(f"{path}: its last line was cut off (a server stopped mid-write); removed it ({len(data) - keep} bytes)")
