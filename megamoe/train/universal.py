"""megamoe's universal checkpoint format: canonical per-parameter pieces, written per rank.

What a rank writes (``shards/rank{r}.safetensors`` + ``shards/rank{r}.json``): for each piece
of a canonical tensor it owns (see ``megamoe.model.state_dict.Piece``: a box of the canonical
tensor, possibly transposed locally) the elements of its ZeRO fragment, for three states:
``weight`` (the fp32 master of a parameter, or a buffer's value: hash tables, router state),
``exp_avg`` and ``exp_avg_sq`` (AdamW moments), plus each parameter's AdamW step count. The JSON
names, per tensor, its canonical key, box, element range, dtype and CRC-32, and the data
file's size. Any other layout reads them back by assembling one canonical tensor at a time.

Why not DeepSpeed's universal checkpoint: ``ds_to_universal`` merges ZeRO fragments of each
*module* parameter across DP and TP, but it keys everything by the module's parameter names and
has no notion of experts sharded over EP ranks (DeepSpeed #5716: "universal checkpoint does not
support MoE"); its TP merge needs per-parameter patterns for which dim is sharded (Megatron's
``universal_checkpoint_info``), and megamoe's stacked / transposed / MultiHash-blocked expert
tensors fit none of them. ``torch.distributed.checkpoint`` would need DTensor placements for
DeepSpeed's flat ZeRO partitions. The canonical pieces here are learned from the model's own
``load_full`` (layout-agnostic), and the optimizer fragments come from DeepSpeed's public
``_hp_mapping`` (the same fields ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
read), so a rank never gathers anything: it writes its own fragments, one tensor at a time.

Traps:
- The safetensors header needs every tensor's size up front: the writer computes it from the
  piece list, then streams each tensor (never more than one in host memory).
- This module is imported by the ``zero_to_fp32.py`` copy in every save dir: keep it free of
  heavy megamoe imports (torch, safetensors and the standard library only at module level).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import torch

FORMAT = "megamoe-universal/1"
STATES = ("weight", "exp_avg", "exp_avg_sq")
SHARD_DIR = "shards"

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_NAMES = {str(d).replace("torch.", ""): d for d in _ST_DTYPES}


class CheckpointDamaged(Exception):
    """A checkpoint file is damaged; ``str()`` names the file and what to do."""


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _header(entries: list, metadata: dict | None) -> tuple[bytes, list[int]]:
    """(the safetensors header bytes, each entry's data offset), the same on every rank."""
    header, pos, offsets = {}, 0, []
    for name, dtype, shape, _ in entries:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append(pos)
        pos += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets + [pos]


def _fetched_bytes(name: str, dtype, shape, fetch) -> memoryview:
    t = fetch()
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"{name}: fetched {t.dtype}{tuple(t.shape)}, header says {dtype}{tuple(shape)}")
    return _bytes(t)


def write_safetensors(path: Path, entries: list, metadata: dict | None = None) -> dict:
    """Stream ``entries`` = [(name, dtype, shape, fetch)] into a safetensors file, calling each
    ``fetch()`` only when its bytes are due. Atomic (temp + rename). Returns {name: crc32}."""
    head, _ = _header(entries, metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    crcs = {}
    with open(tmp, "wb") as f:
        f.write(head)
        for entry in entries:
            b = _fetched_bytes(*entry)
            crcs[entry[0]] = zlib.crc32(b)
            f.write(b)
            del b
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return crcs


def share_by_size(sizes: list[int], world: int) -> list[list[int]]:
    """Entry indices per rank, largest first to the least-loaded rank (deterministic)."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += sizes[i]
    return shares


def write_safetensors_shared(path: Path, entries: list, metadata: dict | None, rank: int, world: int,
                             barrier) -> None:
    """:func:`write_safetensors` by ``world`` ranks at once, each writing its share of the entries
    (:func:`share_by_size`) at their offsets in one file that rank 0 sized; collective (``barrier``
    between the steps). Atomic like the single-writer form: rank 0 renames after the last barrier."""
    head, offsets = _header(entries, metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0:
        with open(tmp, "wb") as f:
            f.write(head)
            f.truncate(len(head) + offsets[-1])
    barrier()
    mine = share_by_size([offsets[i + 1] - offsets[i] for i in range(len(entries))], world)[rank]
    with open(tmp, "r+b") as f:
        for i in sorted(mine):
            f.seek(len(head) + offsets[i])
            f.write(_fetched_bytes(*entries[i]))
        f.flush()
        os.fsync(f.fileno())
    barrier()
    if rank == 0:
        os.replace(tmp, path)


def _damaged(path, what: str) -> CheckpointDamaged:
    return CheckpointDamaged(f"{path} is damaged ({what}); this checkpoint cannot be read: resume or export from "
                             "an earlier complete one (point 'latest' at another global_stepN, or pass --tag), or "
                             "copy the file again if it came from elsewhere")


class SafetensorsFile:
    """Read tensors of a safetensors file one at a time with plain reads (no mmap: pages of a
    mapped file would count as resident memory of the reader, all of them by the end)."""

    def __init__(self, path: Path, header: dict, data_start: int):
        self.path, self.header, self.data_start = path, header, data_start

    def keys(self):
        return [k for k in self.header if k != "__metadata__"]

    def get_tensor(self, name: str) -> torch.Tensor:
        h = self.header[name]
        a, b = h["data_offsets"]
        dtype = {v: k for k, v in _ST_DTYPES.items()}[h["dtype"]]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + a)
            buf = bytearray(f.read(b - a))
        if len(buf) != b - a:
            raise _damaged(self.path, f"tensor {name} is cut short")
        t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return t.view(dtype).view(h["shape"]) if h["shape"] else t.view(dtype).reshape(())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def open_safetensors(path: Path, expected_size: int | None = None) -> SafetensorsFile:
    """Parse and check a safetensors header; every failure becomes :class:`CheckpointDamaged`
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise _damaged(path, "file missing")
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise _damaged(path, f"{size} bytes, the checkpoint index expects {expected_size}: truncated?")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        if 8 + n + end != size:
            raise ValueError(f"{size} bytes, its header describes {8 + n + end}: truncated?")
        return SafetensorsFile(path, header, 8 + n)
    except CheckpointDamaged:
        raise
    except Exception as e:  # struct / json errors of a damaged file
        raise _damaged(path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise _damaged(path, "file missing")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, f"not valid JSON: {e}") from None


def _box_index(box) -> list[torch.Tensor]:
    return [torch.cat([torch.arange(a, b) for a, b in runs]) for runs in box]


class CheckpointReader:
    """Canonical tensors of one universal checkpoint directory (``global_stepN``), assembled
    one at a time from every rank's pieces; validates sizes and checksums as it reads."""

    def __init__(self, tag_dir: str | Path):
        self.dir = Path(tag_dir)
        shard_dir = self.dir / SHARD_DIR
        index_files = sorted(shard_dir.glob("rank*.json"))
        if not index_files:
            raise _damaged(shard_dir, "no rank*.json index files")
        self.files: list[Path] = []
        self.entries: dict[tuple[str, str], list] = {}
        self.meta: dict[str, dict] = {}  # key -> {shape, dtype, param, step}
        self._sizes = []
        for jf in index_files:
            idx = read_json(jf)
            if idx.get("format") != FORMAT:
                raise _damaged(jf, f"format {idx.get('format')!r}, expected {FORMAT!r}")
            fi = len(self.files)
            self.files.append(shard_dir / idx["file"])
            self._sizes.append(int(idx["size"]))
            for t in idx["tensors"]:
                self.entries.setdefault((t["key"], t["state"]), []).append((fi, t))
                m = self.meta.setdefault(t["key"], {"shape": tuple(t["shape"]), "dtype": t["dtype"],
                                                    "param": t["param"]})
                if t["state"] == "weight":
                    m["dtype"] = t["dtype"]
            for k, s in idx.get("steps", {}).items():
                self.meta.setdefault(k, {})["step"] = s
        world = idx.get("world")
        if world is not None and len(index_files) != world:
            have = sorted(f.name for f in index_files)
            raise _damaged(shard_dir, f"{len(index_files)} rank index files ({', '.join(have[:4])}...) but {world} "
                                      "ranks wrote this checkpoint: a rank's shard is missing")
        self._open: dict[int, object] = {}
        for fi in range(len(self.files)):  # headers and sizes of every file, before any data is used
            self._handle(fi)

    def _handle(self, fi: int):
        if fi not in self._open:
            self._open[fi] = open_safetensors(self.files[fi], self._sizes[fi])
        return self._open[fi]

    def keys(self, state: str = "weight") -> list[str]:
        return [k for k in self.meta if (k, state) in self.entries]

    def has(self, state: str) -> bool:
        return any(s == state for _, s in self.entries)

    def step(self, key: str):
        return self.meta.get(key, {}).get("step")

    def full(self, key: str, state: str = "weight") -> torch.Tensor:
        meta = self.meta[key]
        shape, dtype = meta["shape"], _NAMES[meta["dtype"]] if state == "weight" else torch.float32
        entries = self.entries.get((key, state), [])
        numel = int(torch.Size(shape).numel())
        if len(entries) == 1:  # one piece holds the whole tensor in order: no assembly buffers
            fi, t = entries[0]
            whole = all(len(r) == 1 and r[0] == [0, n] for r, n in zip(t["box"], shape))
            if whole and t["range"] == [0, numel] and list(t["perm"]) in ([], list(range(len(shape)))):
                return self._read(fi, t, key, state).to(dtype).view(shape)
        out = torch.zeros(shape, dtype=dtype)
        covered = torch.zeros(shape, dtype=torch.bool)
        boxes: dict = {}
        for fi, t in entries:
            data = self._read(fi, t, key, state)
            box = tuple(tuple(tuple(r) for r in runs) for runs in t["box"])
            perm = tuple(t["perm"]) or tuple(range(len(shape)))
            bk = (box, perm)
            if bk not in boxes:
                lshape = [sum(b - a for a, b in box[d]) for d in perm]
                boxes[bk] = (torch.zeros(lshape, dtype=dtype).reshape(-1), torch.zeros(int(torch.Size(lshape).numel()),
                                                                                          dtype=torch.bool))
            buf, seen = boxes[bk]
            lo, hi = t["range"]
            buf[lo:hi] = data.to(dtype)
            seen[lo:hi] = True
        for (box, perm), (buf, seen) in boxes.items():
            lshape = [sum(b - a for a, b in box[d]) for d in perm]
            inv = [perm.index(d) for d in range(len(perm))]
            vals = buf.view(lshape).permute(inv) if lshape else buf.view(())
            mask = seen.view(lshape).permute(inv) if lshape else seen.view(())
            if not shape:
                out.copy_(vals)
                covered |= mask
                continue
            idx = _box_index(box)
            grid = [i.view([-1 if d == j else 1 for j in range(len(shape))]) for d, i in enumerate(idx)]
            grid = tuple(grid)
            out.index_put_(grid, vals if bool(mask.all()) else torch.where(mask, vals, out[grid]))
            covered.index_put_(grid, mask | covered[grid])
        if not bool(covered.all()):
            missing = int((~covered).sum())
            raise _damaged(self.dir / SHARD_DIR, f"{missing} of {covered.numel()} elements of {key} ({state}) are in "
                                                 "no shard: a rank's shard file is missing")
        return out

    def _read(self, fi: int, t: dict, key: str, state: str) -> torch.Tensor:
        try:
            data = self._handle(fi).get_tensor(t["name"])
        except CheckpointDamaged:
            raise
        except Exception as e:
            raise _damaged(self.files[fi], f"tensor {t['name']}: {e}") from None
        if zlib.crc32(_bytes(data)) != t["crc32"]:
            raise _damaged(self.files[fi], f"checksum of {key} ({state}) does not match")
        return data

    def state_dict(self, state: str = "weight", fallback: str | None = "weight"):
        """Lazy ``{key: full tensor}`` of ``state``; keys without it (buffers have no moments)
        come from ``fallback``."""
        from megamoe.model.state_dict import LazyDict

        keys = [k for k in self.meta if (k, state) in self.entries or (fallback and (k, fallback) in self.entries)]
        return LazyDict(keys, lambda k: self.full(k, state if (k, state) in self.entries else fallback))


def consolidate(tag_dir: str | Path, out: str | Path, state: str = "weight", rank: int = 0, world: int = 1,
                barrier=None) -> Path:
    """Write the full canonical model (fp32 masters, buffers as saved) to ``out`` (.safetensors),
    streaming one tensor at a time. With ``world > 1`` every rank calls it and writes 1 / world of
    the bytes (a save's consolidation: no rank works minutes alone while the others wait in a
    collective, which NCCL's watchdog would end)."""
    r = CheckpointReader(tag_dir)
    keys = sorted(r.keys(state))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dt = {k: _NAMES[r.meta[k]["dtype"]] if state == "weight" else torch.float32 for k in keys}
    entries = [(k, dt[k], r.meta[k]["shape"], (lambda k=k: r.full(k, state))) for k in keys]
    metadata = {"format": "pt", "source": str(Path(tag_dir).resolve()), "state": state}
    if world == 1:
        write_safetensors(out, entries, metadata)
    else:
        write_safetensors_shared(out, entries, metadata, rank, world, barrier)
    return out
