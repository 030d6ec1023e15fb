"""Where a fused decode step's time goes: the step replayed with kernel classes left out.

    python benchmarks/ablate_decode_step.py [--case 1x4096] [--arms all,mix,wkv,norm,...] [--rounds 2] [--out DIR]

Each arm leaves out the launches of the named kernel classes (joined by "+"): `mix` (`finch_mix`),
`wkv` (`finch_wkv_decode`), `norm` (`decode_norm_mix`), `gemv` (`decode_gemv`: every product and
the head), `attn` (paged decode attention and its reduce); `all` leaves nothing out. A left-out
kernel is replaced by an empty output of its shape, so **the arms compute garbage**: only their
time means anything. The difference between `all` and an arm is what that class costs the step,
dependency waits included (kernel times from a profiler miss those). Each arm runs in a process of
its own (its replacements are module attributes), decoding through the engine as `bench_model.py
--decode` does (K/V working sets, graph replay; the model's random weights, bf16, 1.5B shape).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from gpu_timing import commit_id, write_result  # noqa: E402

CLASSES = ("mix", "wkv", "norm", "gemv", "attn")
DEFAULT_ARMS = "all,mix,wkv,norm,mix+wkv+norm,attn,gemv,mix+wkv+norm+attn,all"


def parse_arm(arm: str) -> tuple[str, ...]:
    """The kernel classes an arm leaves out ("all": none); ValueError naming an unknown one."""
    if arm == "all":
        return ()
    names = tuple(arm.split("+"))
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        raise ValueError(f"arm {arm!r}: unknown kernel classes {unknown}; choose from {CLASSES} or 'all'")
    return names


def leave_out(classes: tuple[str, ...], setattr_=setattr) -> None:
    """Replaces the named kernel classes in the decode step's modules by launch-free stand-ins that
    return empty outputs of the right shapes (`setattr_`: a test passes monkeypatch.setattr)."""
    import engine.decode_fused as fused
    import engine.decode_step as step

    stand_ins = {
        "mix": (fused, "finch_mix", lambda xa, prev, h, w2, maa, *a, **k: xa.new_empty(maa.shape[0], *xa.shape)),
        "wkv": (fused, "finch_wkv_decode", lambda r, *a, **k: torch.empty_like(r)),
        "norm": (fused, "decode_norm_mix", lambda *a, **k: None),
        "gemv": (fused, "decode_gemv", lambda x, weight, out, *a, **k: out),
        "attn": (step, "paged_attention", lambda q, *a, **k: torch.empty_like(q)),
    }
    for name in classes:
        module, attr, fn = stand_ins[name]
        setattr_(module, attr, fn)


def run_arm(arm: str, case: tuple[int, int], rounds: int) -> list[float]:
    """In this process: graph ms of one step per round, the arm's classes left out."""
    from bench_model import bench_decode
    from engine.model import GoldFinchModel
    from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint

    leave_out(parse_arm(arm))
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    out = []
    for _ in range(rounds):
        for r in bench_decode(model, [(case[0], case[1], "sets")], time.monotonic() + 300):
            out.append(round(r.get("graph_ms", float("nan")), 4))
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="1x4096", help="BATCHxCONTEXT")
    ap.add_argument("--arms", default=DEFAULT_ARMS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # a child process: run this arm, print its times
    args = ap.parse_args()
    case = tuple(int(v) for v in args.case.split("x"))
    if args.arm:
        print("ARM_MS", *run_arm(args.arm, case, args.rounds), flush=True)
        return
    arms = args.arms.split(",")
    for arm in arms:
        parse_arm(arm)  # every arm checked before the first is run
    rows = []
    for arm in arms:
        try:
            proc = subprocess.run([sys.executable, __file__, "--arm", arm, "--case", args.case, "--rounds",
                                   str(args.rounds)], capture_output=True, text=True, timeout=600)
            stdout, error = proc.stdout, proc.stderr[-500:]
        except subprocess.TimeoutExpired:  # one stuck arm does not lose the others' rows
            stdout, error = "", "timed out after 600 s"
        line = [ln for ln in stdout.splitlines() if ln.startswith("ARM_MS")]
        ms = [float(v) for v in line[-1].split()[1:]] if line else []
        rows.append({"arm": arm, "graph_ms": ms, **({} if ms else {"error": error})})
        print(rows[-1], flush=True)
    base = [min(r["graph_ms"]) for r in rows if r["arm"] == "all" and r["graph_ms"]]
    device = torch.cuda.get_device_name()
    lines = [f"# Decode step with kernel classes left out ({device}, commit {commit_id()}, "
             f"{time.strftime('%Y-%m-%d')}), batch x context {args.case}", "",
             "Arms compute garbage: only their times mean anything. Graph ms of one step per round.", "",
             "| left out | graph ms | best | saved against all (best) |", "| --- | --- | --- | --- |"]
    for r in rows:
        best = min(r["graph_ms"]) if r["graph_ms"] else None
        saved = f"{(min(base) - best) * 1e3:.0f} us" if best is not None and base else "-"
        times = ", ".join(f"{v:.3f}" for v in r["graph_ms"]) or r.get("error", "-")[-80:]
        name = r["arm"] if r["arm"] != "all" else "nothing"
        lines.append(f"| {name} | {times} | {best if best is not None else '-'} | {saved} |")
    write_result(args.out, f"ablate_decode_step_{commit_id()}",
                 {"device": device, "commit": commit_id(), "case": args.case, "arms": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
