"""Inference speed side by side: ours in float32, ours in the recommended setting, the published code.

    python -m benchmarks.inference --published DIR                       # every backbone, 512x512
    python -m benchmarks.inference --models BRN RCDNet --size 256 --rounds 5 --published DIR
    python -m benchmarks.inference --settings fp32 recommended channels_last --models IDT

Each contender is one long-lived process (``benchmarks.serve``) holding its model, encoder and a
synthetic rainy image; the parent asks them in turn for one timed restoration at a time, rotating
the order every round, so that the drift of a shared machine hits all alike. Every time is the
median over ``--rounds`` (wall clock, and the process's CPU time, which leaves out the time the
process waited for a core). With ``--published`` the published model is built first and our
processes load its weights (published state_dicts load as they are), so the outputs must agree:
the table gives the largest difference of the backbone outputs (a tile-sized input, both modes).

Settings: ``fp32``; ``recommended`` (``utils.eval.precision.recommended_setting``: measured once when it is
fp32 on this machine); ``bf16`` and ``channels_last`` to measure one change on its own. The
modulated path is also checked against a plain convolution of the same shape at batch 1
(``conv_check``). Results: ``inference.md`` and ``inference.json`` in ``--save_path``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import tempfile
from typing import Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.published import counterparts  # noqa: E402
from benchmarks.roofline import conv_check, conv_rate  # noqa: E402
from benchmarks.serve import Worker, WorkerError, serve  # noqa: E402
from models import available_models, model_class, tile_size  # noqa: E402
from utils.allocator import keep_freed_memory  # noqa: E402
from utils.cli import HelpFormatter, add_device_args, add_list  # noqa: E402
from utils.tables import markdown_table  # noqa: E402

MODES = ("plain", "coic")
RESULT_NAME = "inference"


class InferenceBenchError(Exception):
    """A user-facing error of this command: one line, exit status 2."""


# --------------------------------------------------------------------------- settings
def resolve_settings(names: Sequence[str], device: torch.device) -> tuple[list, dict[str, str]]:
    """The settings to measure, (label, amp, channels_last, auto) each, and the aliases: a setting
    equal to an earlier one is measured once. ``auto``: the recommended setting of a CPU without
    native bf16, whose memory format each backbone's worker times (``utils.eval.precision.faster_memory_format``)."""
    from utils.eval.precision import native_bf16, recommended_setting

    rec = recommended_setting(device)
    auto = device.type == "cpu" and not native_bf16()
    table = {"fp32": (None, False), "recommended": (rec.amp, rec.channels_last), "bf16": ("bf16", False),
             "channels_last": (None, True), "bf16_channels_last": ("bf16", True)}
    measured, aliases, seen = [], {}, {}
    for name in names:
        if name not in table:
            raise InferenceBenchError(f"unknown --settings {name}; choose from {', '.join(table)}")
        if name == "recommended" and auto:
            measured.append((name, None, False, True))
            continue
        key = table[name]
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        measured.append((name, *key, False))
    return measured, aliases


def check_size(model_name: str) -> int:
    """Side of the input on which the backbone outputs are compared: the tile of a backbone that declares
    one (IDT's, in its reference configuration), else 64."""
    return tile_size(model_class(model_name)) or 64


# --------------------------------------------------------------------------- our worker
class OursServer:
    """Requests of the parent, on our side: setup, run (timed restorations), output (saved tensors)."""

    def __init__(self):
        self.model = self.encoder = self.x = None

    def __call__(self, request: dict) -> dict:
        return getattr(self, request["op"])(request)

    def setup(self, r: dict) -> dict:
        from benchmarks.timing import synthetic_batch
        from models import build_encoder, build_model
        from utils.checkpoint import load_weights

        torch.set_num_threads(r["threads"])
        self.device = torch.device(r["device"])
        torch.manual_seed(r["seed"])
        model, encoder = build_model(r["model"]), build_encoder(dim=128)
        if r.get("state_path"):  # the published weights, in the published layout
            state = torch.load(r["state_path"], map_location="cpu", weights_only=True)
            load_weights(model, state["model"])
            load_weights(encoder, state["encoder"], part="encoder")
        model, encoder = model.to(self.device).eval(), encoder.to(self.device).eval()
        generator = torch.Generator().manual_seed(r["seed"])
        self.x = synthetic_batch(1, r["size"], generator)[0]
        self.x_check = synthetic_batch(1, r["check_size"], generator)[0]
        amp, channels_last, reasons = r["amp"], {m: r["channels_last"] for m in MODES}, {m: "" for m in MODES}
        if r.get("auto"):  # the recommended setting, its memory format timed on this model in each mode
            from utils.eval.inference import image_code
            from utils.eval.precision import recommended_setting

            code = image_code(encoder, self.x_check.to(self.device))
            for mode in MODES:  # the faster memory format can differ: IDT's modulated convs prefer channels-last
                rec = recommended_setting(self.device, model=model, z=code if mode == "coic" else None)
                amp, channels_last[mode], reasons[mode] = rec.amp, rec.channels_last, rec.reason
        self.formats = {m: torch.channels_last if cl else torch.contiguous_format for m, cl in channels_last.items()}
        self.model, self.encoder, self.memory_format = model, encoder, None
        self.amp, self.overlap = amp, r["overlap"]
        return {"amp": amp, "channels_last": [channels_last[m] for m in MODES], "reason": [reasons[m] for m in MODES]}

    def _memory_format(self, mode: str):
        """Put the model and encoder in ``mode``'s memory format (a no-op when they are in it already)."""
        fmt = self.formats[mode]
        if self.memory_format is not fmt:
            self.model.to(memory_format=fmt)
            self.encoder.to(memory_format=fmt)
            self.memory_format = fmt
        return fmt

    def _restore(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        from utils.eval.inference import image_code, restore

        x = x.to(self.device).contiguous(memory_format=self._memory_format(mode))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            z = image_code(self.encoder, x) if mode == "coic" else None
            return restore(self.model, x, z, overlap=self.overlap).float()

    def run(self, r: dict) -> dict:
        from benchmarks.timing import time_restorations

        self._memory_format(r["mode"])  # outside the timed restorations
        return time_restorations(lambda: self._restore(self.x, r["mode"]), r["n"], self.device)

    def flops(self, r: dict) -> dict:
        """FLOPs (convolutions and matrix products) of one timed restoration in each mode."""
        from analysis.model_cost import count_macs

        return {m: 2 * count_macs(functools.partial(self._restore, self.x, m)) for m in MODES}

    def output(self, r: dict) -> dict:
        from utils.eval.inference import image_code

        x = self.x_check.to(self.device).contiguous(memory_format=self._memory_format(r["mode"]))
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.amp == "bf16"):
            z = image_code(self.encoder, x) if r["mode"] == "coic" else None
            y = self.model(x, z).float().cpu()
        torch.save(y, r["path"])
        return {"ok": True}


# --------------------------------------------------------------------------- one backbone
def measure_backbone(name: str, args: argparse.Namespace, settings: list, device: torch.device,
                     tmp: str) -> dict:
    """Times (ms, medians) and output differences of every contender for backbone ``name``."""
    common = dict(model=name, size=args.size, threads=args.threads, device=str(device), seed=args.seed,
                  overlap=args.tile_overlap, check_size=check_size(name))
    workers: dict[str, Worker] = {}
    try:
        state_path = None
        if args.published:
            pub = Worker("published", [os.path.join(REPO_ROOT, "benchmarks", "published.py"), "--serve"],
                         cwd=os.path.abspath(args.published))
            workers["published"] = pub
            state_path = os.path.join(tmp, f"{name}_published_state.pt")
            pub.call("setup", state_path=state_path, published_code=counterparts([name])[name], **common)
        aliases, chosen, recommended, amps = {}, {}, None, {}
        for label, amp, channels_last, auto in settings:
            w = Worker(f"ours {label}", ["-m", "benchmarks.inference", "--serve"], cwd=REPO_ROOT)
            workers[label] = w
            got = w.call("setup", amp=amp, channels_last=channels_last, auto=auto, state_path=state_path, **common)
            amps[label] = got["amp"]
            key = (got["amp"], tuple(got["channels_last"]))
            if auto:
                from utils.eval.precision import Setting

                recommended = {m: {"label": Setting(got["amp"], cl).label, "reason": why}
                               for m, cl, why in zip(MODES, got["channels_last"], got["reason"])}
            if key in chosen:  # the same setting as one measured already: measure it once
                aliases[label] = chosen[key]
                workers.pop(label).close()
            else:
                chosen[key] = label
        diffs = compare_outputs(workers, tmp, name)
        flops = workers["fp32"].call("flops")
        for w in workers.values():
            for mode in MODES:
                if args.warmup:
                    w.call("run", mode=mode, n=args.warmup)
        times = {k: {m: {"wall": [], "cpu": []} for m in MODES} for k in workers}
        keys = list(workers)
        for r in range(args.rounds):
            for mode in MODES:
                for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                    answer = workers[k].call("run", mode=mode, n=1)
                    for clock in ("wall", "cpu"):
                        times[k][mode][clock] += answer[clock]
        medians = {k: {m: {c: 1000 * statistics.median(v) for c, v in t.items()} for m, t in per.items()}
                   for k, per in times.items()}
        return {"ms": medians, "diffs": diffs, "aliases": aliases, "recommended": recommended, "flops": flops,
                "amps": amps}
    finally:
        for w in workers.values():
            w.close()


def output_difference(ref: torch.Tensor, other: torch.Tensor) -> float:
    """max |ref - other|, divided by max |ref| where that is above 1: an untrained RCDNet's CoIC outputs
    reach 1e10, and a difference of one rounding there is large in absolute terms."""
    return float((ref - other).abs().max() / max(1.0, float(ref.abs().max())))


def compare_outputs(workers: dict, tmp: str, name: str) -> dict:
    """``output_difference`` of the backbone outputs: ours fp32 vs published, every other setting vs ours fp32."""
    outs = {}
    for key, w in workers.items():
        for mode in MODES:
            path = os.path.join(tmp, f"{name}_{key}_{mode}.pt")
            w.call("output", mode=mode, path=path)
            outs[(key, mode)] = torch.load(path, weights_only=True)
    diffs = {}
    for mode in MODES:
        ref = outs.get(("fp32", mode))
        if ("published", mode) in outs and ref is not None:
            diffs[f"published_{mode}"] = output_difference(ref, outs[("published", mode)])
        for key in workers:
            if key not in ("published", "fp32") and ref is not None:
                diffs[f"{key}_{mode}"] = output_difference(ref, outs[(key, mode)])
    return diffs


# --------------------------------------------------------------------------- report
def table_rows(results: dict, labels: Sequence[str], aliases: dict, published: bool,
               rates: Optional[dict] = None) -> list[dict]:
    """One row per backbone and mode: ms of every setting (``labels``, aliases resolved) and the ratios;
    with ``rates`` ({"fp32"|"bf16": conv GFLOP/s}), each setting's GFLOP/s and share of its precision's rate."""
    rows = []
    for name, res in results.items():
        if "error" in res:
            rows.append({"backbone": name, "mode": "—", "note": res["error"]})
            continue
        same = {**aliases, **res.get("aliases", {})}
        rec = same.get("recommended", "recommended") if "recommended" in labels else None
        for mode in MODES:
            ms = res["ms"]
            row = {"backbone": name, "mode": "CoIC" if mode == "coic" else "plain"}
            if res.get("recommended"):
                row["recommended_setting"] = res["recommended"][mode]["label"]
            for label in labels:
                row[f"ours_{label}_ms"] = ms[same.get(label, label)][mode]["wall"]
                if rates and res.get("flops"):
                    gflops = res["flops"][mode] / (row[f"ours_{label}_ms"] / 1000) / 1e9
                    rate = rates[res["amps"][same.get(label, label)] or "fp32"]
                    row[f"ours_{label}_gflops"] = f"{gflops:.0f} ({100 * gflops / rate:.0f} %)"
            ours = ms["fp32"][mode]
            best = ms[rec][mode] if rec else ours
            if rec:
                row["recommended_vs_fp32_cpu"] = best["cpu"] / ours["cpu"]
            if published:
                pub = ms["published"][mode]
                row["published_fp32_ms"] = pub["wall"]
                row["fp32_ratio_wall"] = ours["wall"] / pub["wall"]
                row["fp32_ratio_cpu"] = ours["cpu"] / pub["cpu"]
                row["recommended_speedup"] = pub["wall"] / best["wall"]
                row["recommended_speedup_cpu"] = pub["cpu"] / best["cpu"]
                row["max_diff_published"] = res["diffs"].get(f"published_{mode}")
            rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(rows: list[dict], conv_rows: list[dict], labels: Sequence[str], recommended: str, header: str,
             notes: Sequence[str]) -> str:
    cols = [("backbone", "backbone"), ("mode", "mode")]
    if any("recommended_setting" in r for r in rows):
        cols.append(("recommended_setting", "recommended setting"))
    cols += [(f"ours_{lab}_ms", f"ours {lab} ({recommended}) ms" if lab == "recommended" and recommended
              else f"ours {lab} ms") for lab in labels]
    cols += [(f"ours_{lab}_gflops", f"ours {lab} GFLOP/s (share of the conv rate)") for lab in labels
             if any(f"ours_{lab}_gflops" in r for r in rows)]
    if any("published_fp32_ms" in r for r in rows):
        cols += [("published_fp32_ms", "published fp32 ms"), ("fp32_ratio_wall", "ours fp32 ÷ published (wall)"),
                 ("fp32_ratio_cpu", "ours fp32 ÷ published (CPU time)"),
                 ("recommended_speedup", "published ÷ ours recommended (wall)"),
                 ("recommended_speedup_cpu", "published ÷ ours recommended (CPU time)"),
                 ("max_diff_published", "max abs diff of the outputs, ours − published")]
    elif any("recommended_vs_fp32_cpu" in r for r in rows):
        cols.append(("recommended_vs_fp32_cpu", "ours recommended ÷ fp32 (CPU time)"))
    if any("note" in r for r in rows):
        cols.append(("note", "note"))
    lines = ["# Inference", "", header, "",
             *markdown_table([h for _, h in cols], [[_fmt(r.get(k)) for k, _ in cols] for r in rows])]
    if conv_rows:
        lines += ["", "Modulated convolution (per-image kernel, grouped form) against a plain one of the same shape, "
                  "batch 1, CPU time:", "",
                  *markdown_table(["backbone", "shape", "plain ms", "modulated ms", "modulated ÷ plain"],
                                  [[c["backbone"], c["shape"], _fmt(c["plain_ms"]), _fmt(c["modulated_ms"]),
                                    _fmt(c["ratio"])] for c in conv_rows])]
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Inference ms per image, ours (fp32 and the recommended setting) "
                                "and the published code side by side, same weights.",
                                formatter_class=HelpFormatter)
    add_list(p, "--models", default=available_models(), metavar="NAME",
             help="backbones, space- or comma-separated (default: every registered one)")
    add_list(p, "--settings", default=["fp32", "recommended"], metavar="NAME",
             help="fp32, recommended, bf16, channels_last, bf16_channels_last (fp32 always runs)")
    p.add_argument("--size", type=int, default=512, help="side of the square image restored")
    p.add_argument("--tile_overlap", type=int, default=32, help="overlap of the tiles of backbones that tile (IDT)")
    p.add_argument("--rounds", type=int, default=3, help="timed restorations per contender and mode (medians)")
    p.add_argument("--warmup", type=int, default=1, help="untimed restorations per contender and mode first")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (1 on a shared machine)")
    add_device_args(p, "measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--published", default=None, metavar="DIR", help="checkout of github Schizophreni/CoIC")
    p.add_argument("--conv_size", type=int, default=256, help="side of the maps of the convolution check (0: skip)")
    p.add_argument("--save_path", default=os.path.join("benchmarks", "results"))
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # ours runs as its commands do (utils.allocator); the published code as it ships
    if args.serve:
        return serve(OursServer())
    from utils.errors import cli_main

    def work() -> int:
        report = run(args)
        return 1 if any("error" in r for r in report["raw"].values()) else 0

    return cli_main(work, also=(InferenceBenchError,))


def _check(args: argparse.Namespace) -> torch.device:
    unknown = [m for m in args.models if m not in available_models()]
    if unknown:
        raise InferenceBenchError(f"unknown --models {', '.join(unknown)}; choose from {', '.join(available_models())}")
    for key, low in (("size", 8), ("rounds", 1), ("warmup", 0), ("threads", 1), ("tile_overlap", 0),
                     ("conv_size", 0)):
        if getattr(args, key) < low:
            raise InferenceBenchError(f"--{key} must be at least {low}, got {getattr(args, key)}")
    if args.published is not None and not os.path.isdir(os.path.join(args.published, "models")):
        raise InferenceBenchError(f"--published {args.published} is not a checkout of Schizophreni/CoIC "
                                  "(no models/ folder)")
    lacking = [m for m in args.models if m not in counterparts(args.models)] if args.published else []
    if lacking:
        raise InferenceBenchError(f"--published: models/__init__.py declares no published counterpart "
                                  f"(published_code) of {', '.join(lacking)}; leave it out of --models")
    if args.use_GPU and not torch.cuda.is_available():
        raise InferenceBenchError("--use_GPU asks for CUDA, which is not available here; drop it to measure the CPU")
    device = torch.device(f"cuda:{int(args.gpu_id)}" if args.use_GPU else "cpu")
    return device


def run(args: argparse.Namespace) -> dict:
    """Measure, print and write the tables; the results as a dict (also ``inference.json``)."""
    from utils.eval.precision import cpu_model_name, recommended_setting

    device = _check(args)
    labels = ["fp32"] + list(dict.fromkeys(s for s in args.settings if s != "fp32"))
    settings, aliases = resolve_settings(labels, device)
    rec = recommended_setting(device)
    results = {}
    with tempfile.TemporaryDirectory(prefix="coic_infer_") as tmp:
        for name in args.models:
            print(f"{name}: measuring ...", flush=True)
            try:
                results[name] = measure_backbone(name, args, settings, device, tmp)
            except WorkerError as exc:
                results[name] = {"error": str(exc)}
    conv_rows = conv_check(args.conv_size, max(args.rounds, 5), args.threads, args.models) \
        if args.conv_size and device.type == "cpu" else []
    rates = {"fp32": conv_rate(torch.float32, args.threads), "bf16": conv_rate(torch.bfloat16, args.threads)} \
        if device.type == "cpu" else None
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()
    header = (f"device: {dev} ({device.type}), {args.threads} thread(s) per process | torch {torch.__version__} | "
              f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} | {args.size}x{args.size} image, median of "
              f"{args.rounds} alternating rounds after {args.warmup} warm-up")
    notes = [f"recommended here: {rec.label} ({rec.reason})" if not any(a for *_, a in settings) else
             "recommended here: " + "; ".join(f"{n} {m}: {r['recommended'][m]['label']} ({r['recommended'][m]['reason']})"
                                                for n, r in results.items() if r.get("recommended") for m in MODES),
             "ms: wall clock per image (z from the key encoder included in CoIC mode); the CPU-time ratio leaves "
             "out the time a process waited for a core on a shared machine",
             "max abs diff: backbone outputs (not clamped) on the same tile-sized input and weights, "
             "divided by the largest output value where that is above 1 (untrained recurrent models can reach 1e10)"]
    if rates:
        notes.append(f"conv rate (benchmarks/roofline.py): a plain 3x3 convolution, 32 -> 32 channels on a 256x256 map, "
                     f"channels-last, {args.threads} thread(s): fp32 {rates['fp32']:.0f} GFLOP/s, bf16 "
                     f"{rates['bf16']:.0f} GFLOP/s; a setting's share is of its own precision's rate (FLOPs: "
                     "convolutions and matrix products of one restoration, torch.utils.flop_counter)")
    for label, same in aliases.items():
        notes.append(f"{label} is {same} on this machine: measured once, the same numbers in both columns")
    for n, r in results.items():
        for label, same in r.get("aliases", {}).items():
            notes.append(f"{n}: {label} is {same}, measured once")
    rows = table_rows(results, labels, aliases, bool(args.published), rates)
    text = markdown(rows, conv_rows, labels, "" if any(a for *_, a in settings) else rec.label, header, notes)
    from utils.io import atomic_write_text

    report = {"header": header, "device": dev, "torch": torch.__version__, "rows": rows, "conv": conv_rows,
              "conv_rate_gflops": rates,
              "raw": results, "recommended": rec.label}
    atomic_write_text(os.path.join(args.save_path, f"{RESULT_NAME}.md"), text)
    atomic_write_text(os.path.join(args.save_path, f"{RESULT_NAME}.json"), json.dumps(report, indent=1))
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(main())
