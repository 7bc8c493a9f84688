"""Write the measured numbers from benchmarks/results/ into benchmarks/README.md and the model card.

    python benchmarks/summarize.py

Run after speed.py, kodak.py, export_cost.py and run_bench.sh, whenever shipped weights change. It only
copies numbers from the result files; nothing is typed by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
CARD = HERE.parent / "bsqcodec" / "models" / "README.md"
CODECS = ("jpeg", "webp", "avif", "jxl")


def load(name: str) -> dict | None:
    p = RES / name
    return json.loads(p.read_text()) if p.exists() else None


def kodak_line(preset: str, bench: dict) -> str:
    k = load(f"kodak-{preset}.json")["summary"]
    t = bench["totals"][preset]
    m = t["matched"]
    return (f"{k['bpp']:.4f} bpp, {k['mean_psnr']:.2f} dB mean RGB PSNR, MS-SSIM {t['mean_ms_ssim']:.4f}; "
            f"{k['coded_bits_per_token']:.2f} bits per token after the prior against {k['raw_bits_per_token']} raw "
            f"({100 * k['saving_vs_raw_tokens']:.1f}% fewer bits). At matched PSNR, image by image: JPEG needs "
            f"{m['jpeg']['ratio']:.3f}x the bytes, WebP {m['webp']['ratio']:.3f}x, AVIF {m['avif']['ratio']:.3f}x, "
            f"JPEG XL {m['jxl']['ratio']:.3f}x (`benchmarks/results/bench-kodak.json`).")


def bench_line(preset: str, bench: dict) -> str:
    """kodak_line for a rung that kodak.py does not measure (a second-stage rung): the bench's numbers only."""
    t = bench["totals"][preset]
    m = t["matched"]
    ratios = ", ".join(f"{name} {m[c]['ratio']:.3f}x" for c, name in (("jpeg", "JPEG needs"), ("webp", "WebP"), ("avif", "AVIF"),
                                                                   ("jxl", "JPEG XL")) if m.get(c, {}).get("ratio"))
    return (f"{t['bpp']:.4f} bpp, {t['mean_psnr']:.2f} dB mean RGB PSNR, MS-SSIM {t['mean_ms_ssim']:.4f}. At matched PSNR, "
            f"image by image: {ratios} the bytes (`benchmarks/results/bench-{bench['dataset']}.json`).")


def _why(bench: dict, codec: str) -> str:
    """Why a BD-rate is missing, from the bench notes, with the two curves' PSNR ranges."""
    note = next((n.split(": ", 1)[1] for n in bench["notes"] if n.startswith(f"BD-rate against {codec}:")), "no result")
    ours = [p["psnr"] for p in bench["curves"]["bsqc"]]
    theirs = [p["psnr"] for p in bench["curves"].get(codec, [])]
    if ours and theirs:
        note += (f": {codec.upper()} spans {min(theirs):.2f}-{max(theirs):.2f} dB over its quality sweep, "
                 f"bsqc {min(ours):.2f}-{max(ours):.2f} dB")
    return note


def results_section(bench: dict) -> str:
    rows = ["| preset | bytes (24 images) | bpp | PSNR (dB) | MS-SSIM | bits/token (raw) | JPEG | WebP | AVIF | JPEG XL | PNG |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset, t in ((p, bench["totals"][p]) for p in bench["presets"]):
        k = (load(f"kodak-{preset}.json") or {}).get("summary")  # kodak.py: first-stage rungs
        ratios = " | ".join(f"{t['matched'][c]['ratio']:.3f}x" if t["matched"].get(c, {}).get("ratio") else "-" for c in CODECS)
        bits = f"{k['coded_bits_per_token']:.2f} ({k['raw_bits_per_token']})" if k else "two stages"
        rows.append(f"| {preset} | {t['bsqc_bytes']} | {t['bpp']:.4f} | {t['mean_psnr']:.2f} | {t['mean_ms_ssim']:.4f} | "
                    f"{bits} | {ratios} | {t['png_ratio']:.1f}x |")
    unreached = sum(m["images_unreachable"] for t in bench["totals"].values() for m in t["matched"].values())
    rng = bench.get("bd_rate_psnr_range_db", {})
    bd = ", ".join(f"{c.upper()} undefined ({_why(bench, c)})" if v is None else
                   f"{c.upper()} {v:+.1f}% (over {rng[c][0]:.2f}-{rng[c][1]:.2f} dB)" if c in rng else f"{c} {v:+.1f}%"
                   for c, v in bench["bd_rate_psnr"].items()) or \
        "not available (bsqc's curve needs at least four presets)"
    out = [f"### {bench['dataset'].capitalize()}, matched PSNR (`results/bench-{bench['dataset']}.json`, `.csv`, `.png`)", "",
           "Each baseline column is the total bytes of that codec's smallest files reaching bsqc's PSNR on each image, "
           "divided by bsqc's total bytes over the same images (above 1: bsqc is smaller). "
           f"Images where a baseline could not reach bsqc's PSNR: {unreached}.", "", *rows, "",
           f"![rate-distortion](results/bench-{bench['dataset']}.png)", "", f"BD-rate (PSNR) of bsqc: {bd}.", ""]
    ec = [load(f"export-cost-{p}.json") for p in bench["totals"]]
    ec = [e for e in ec if e and e["model"] == bench["models"][e["preset"]]]
    if ec:
        out += ["### Cost of the integer export (`results/export-cost-*.json`)", "",
                "Bits of the shipped integer prior against the float prior it was exported from, on all Kodak tokens "
                "(target: under 1%): " + ", ".join(f"{e['preset']} {100 * e['relative_cost']:+.3f}%" for e in ec) + ".", ""]
    nb = load("nested-bits-ladder.json")
    if nb:
        out += ["### Tokenizer alone, by kept bits (`results/nested-bits-ladder.json`)", "",
                f"The ladder's nested tokenizer ({nb['tokenizer_bits']} bits trained; {nb['dataset']}, {nb['images']} images, "
                "no entropy coding): mean RGB PSNR when every token keeps its first k bits.", "",
                "| kept bits | raw bpp | PSNR (dB) |", "|---|---|---|",
                *[f"| {r['bits']} | {r['raw_bpp']:.3f} | {r['mean_psnr']:.2f} |" for r in nb["levels"]], ""]
    for suffix in ("", "-avx2"):
        speeds = [load(f"speed-{p}{suffix}.json") for p in bench["totals"]]
        speeds = [sp for sp in speeds if sp and sp["model"] == bench["models"][sp["preset"]]]
        if not speeds:
            continue
        sp0 = speeds[0]
        out += [f"### Speed and memory, {_cpu_words(sp0['machine'])} (`results/speed-PRESET{suffix}.json`)", "",
                f"{sp0['image']} ({sp0['width']}x{sp0['height']}), {sp0['machine']['cpus']}-core CPU, torch "
                f"{sp0['machine']['torch']}; decode is the best of 3, in process. Targets: decode under 3 s on 2 cores, "
                "8192x8192 encode under 4 GB.", "",
                "| preset | encode | decode, 2 threads | decode, 1 thread | same pixels, 1 and 2 threads | 8192x8192 encode: peak, time |",
                "|---|---|---|---|---|---|"]
        for sp in speeds:
            big = (f"{sp['encode_8192x8192_peak_bytes'] / 1e9:.2f} GB, {sp['encode_8192x8192_seconds']:.0f} s"
                   if sp.get("encode_8192x8192_peak_bytes") else "not run")
            out.append(f"| {sp['preset']} | {sp['encode_seconds']:.2f} s | {sp['decode_seconds_2_threads']:.2f} s | "
                       f"{sp['decode_seconds_1_threads']:.2f} s | {str(sp['pixels_identical_across_threads']).lower()} | {big} |")
        out.append("")
    return "\n".join(out)


def _cpu_words(m: dict) -> str:
    """The machine a speed result came from, in words: its processor and the paths it took."""
    if "cpu" not in m:  # results written before benchmarks recorded the processor
        return "an AVX-512 machine with VNNI and bfloat16 (processor not recorded), measured with 0.5.0's code"
    flags = [f for f, on in m["cpu"]["flags"].items() if on and f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")]
    how = ""
    if m.get("emulated"):
        how = (" (AVX-512 capped by benchmarks/avx2.env: torch, MKL, NumPy and its OpenBLAS at AVX2, the float32 paths forced)"
               if m.get("complete") else
               " (AVX-512 capped: torch's oneDNN, kernels and MKL at AVX2 and the float32 paths forced, but NumPy and its "
               "OpenBLAS still on their AVX-512 kernels: before 0.6.3, faster than an AVX2-only CPU)")
    return (f"{m['cpu']['model']} ({', '.join(flags)}){how}; prior products {m['paths']['prior_products']}, "
            f"pixel decoder {m['paths']['pixel_decoder']}")


def other_dataset_section(bench: dict) -> str:
    """Matched-PSNR totals of a bench on another dataset (CBSD68, McMaster): generalisation."""
    n = bench["images"]
    rows = [f"| preset | bytes ({n} images) | bpp | PSNR (dB) | MS-SSIM | JPEG | WebP | AVIF | JPEG XL |",
            "|---|---|---|---|---|---|---|---|---|"]
    for preset in bench.get("presets", bench["totals"]):  # the ladder's order (merge_bench.py sorts them)
        t = bench["totals"][preset]
        ratios = " | ".join(f"{t['matched'][c]['ratio']:.3f}x" if t["matched"].get(c, {}).get("ratio") else "-" for c in CODECS)
        rows.append(f"| {preset} | {t['bsqc_bytes']} | {t['bpp']:.4f} | {t['mean_psnr']:.2f} | {t['mean_ms_ssim']:.4f} | {ratios} |")
    rng = bench.get("bd_rate_psnr_range_db", {})
    bd = ", ".join(f"{c.upper()} undefined ({_why(bench, c)})" if v is None else
                   f"{c.upper()} {v:+.1f}% (over {rng[c][0]:.2f}-{rng[c][1]:.2f} dB)" if c in rng else f"{c} {v:+.1f}%"
                   for c, v in bench["bd_rate_psnr"].items()) or "not available"
    name = bench["dataset"]
    return "\n".join([f"### {name}, matched PSNR (`results/bench-{name}.json`, `.csv`, `.png`)", "", *rows, "",
                      f"![rate-distortion on {name}](results/bench-{name}.png)", "", f"BD-rate (PSNR) of bsqc: {bd}.", ""])


def robustness_section() -> str:
    out = []
    for suffix in ("", "-avx2"):
        dl = load(f"decode-load-default{suffix}.json")
        if not dl:
            continue
        machine = _cpu_words(dl["machine"]) if isinstance(dl.get("machine"), dict) else _cpu_words({})
        out += [f"### Decoding as a whole process, idle and under load (`results/decode-load-default{suffix}.json`)", "",
                f"Machine: {machine}. `bsqc decode` of {dl['image']} with the {dl['preset']} preset on {dl['cpus']} cores: "
                f"{dl['whole_idle_best']:.2f} s as a whole process, {dl['net_idle_best']:.2f} s net of importing torch, "
                f"numpy, Pillow, constriction, typer and rich (best of {dl['runs']}); beside {dl['busy_processes']} "
                f"CPU-bound processes the slowest of {dl['runs']} took {dl['busy_slowest']:.2f} s, "
                f"{dl['busy_slowest_over_idle_best']:.2f}x the idle time.", ""]
        if "net_idle_best_vs_ordinary_exit" in dl:
            out[-2] += (f" The import is timed as a process that leaves without unloading them, as bsqc does; "
                        f"against a process that imports them and exits the ordinary way (the baseline of "
                        f"earlier runs) the net time is {dl['net_idle_best_vs_ordinary_exit']:.2f} s.")
        zen3 = load("decode-load-default-zen3.json") if suffix else None
        if zen3:
            out[-2] += (f" On a real AVX2-only processor (AMD EPYC Zen 3, no AVX-512; an earlier session's machine, "
                        f"before 0.6.0's start-up work, `results/decode-load-default-zen3.json`): "
                        f"{zen3['net_idle_best']:.2f} s net, {zen3['busy_slowest_over_idle_best']:.2f}x under load.")
        if dl.get("encode_net_idle_best") is not None:
            out[-2] += (f" `bsqc encode` of the same image at effort {dl['encode_effort']}, timed the same way: "
                        f"{dl['encode_net_idle_best']:.2f} s net (best of {len(dl['encode_seconds_idle'])}).")
        if dl.get("bytecode"):
            out[-2] += " bsqcodec's bytecode was written first, as an installed copy has it."
        old = load("decode-load-default-30a1dd8.json") if not suffix else None
        if old:
            out[-2] += (f" Before the single-threaded prior and its worker processes (commit 30a1dd8): "
                        f"{old['net_idle_best']:.2f} s net, {old['busy_slowest_over_idle_best']:.1f}x under load.")
    from bsqcodec.config import RUNG_NAMES

    for suffix in ("", "-avx2"):
        rungs = [(q, load(f"decode-load-{q}{suffix}.json")) for q in RUNG_NAMES]
        rungs = [(q, d) for q, d in rungs if d]
        if not rungs:
            continue
        first = rungs[0][1]
        machine = _cpu_words(first["machine"]) if isinstance(first.get("machine"), dict) else _cpu_words({})
        switches = {k: v for k, v in first.get("machine", {}).get("switches", {}).items() if v}
        how = (" Emulated on that processor with " + ", ".join(f"`{k}={v}`" for k, v in switches.items()) + "."
               if first.get("machine", {}).get("emulated") else "")
        enc = [(q, d) for q, d in rungs if d.get("encode_net_idle_best") is not None]
        how += (" Encoding at the default effort, timed the same way: "
                + ", ".join(f"{q} {d['encode_net_idle_best']:.2f} s (best of {len(d['encode_seconds_idle'])})"
                            for q, d in enc) + "." if enc else "")
        out += [f"### Every rung as a whole process (`results/decode-load-RUNG{suffix}.json`)", "",
                f"Machine: {machine}.{how} `bsqc decode` of {first['image']} on {first['cpus']} cores, net of the "
                f"six imports (best of 5), and the slowest of 5 beside 2 CPU-bound processes against the idle best:", "",
                "| rung | net idle | whole idle | slowest busy / idle |", "|---|---|---|---|",
                *(f"| {q} | {d['net_idle_best']:.2f} s | {d['whole_idle_best']:.2f} s | {d['busy_slowest_over_idle_best']:.2f}x |"
                  for q, d in rungs), ""]
    fz = load("fuzz.json")
    if fz:
        out += ["### Fuzzing (`results/fuzz.json`)", "",
                f"{fz['cases']} structured mutations with valid checksums ({', '.join(fz['by_kind'])}): "
                f"{fz['outcomes'].get('rejected', 0)} rejected with one error, {fz['outcomes'].get('accepted_same', 0)} "
                f"decoded to the original tokens (harmless changes), {fz['outcomes'].get('accepted_header_variant', 0)} valid "
                f"header variants, {fz['outcomes'].get('accepted_model', 0)} model files still valid; "
                f"crashes {fz['crashes']}, hangs {fz['hangs']}, silently accepted altered streams "
                f"{fz['silently_accepted_altered_streams']}; slowest case {fz['slowest_case_seconds']:.2f} s, peak memory "
                f"{fz['peak_rss_bytes_per_worker'] / 1e6:.0f} MB per worker.", ""]
    return "\n".join(out)


def effort_table(eff: dict) -> str:
    """The README's effort table (results/effort-kodak.json)."""
    t = eff.get("encode_seconds", {})
    presets = list(eff["rungs"])
    head = ["effort", "gradient steps", "BD-rate vs effort 1"] + [f"{p} bpp / PSNR" for p in (presets[0], "default", presets[-1])]
    head += [f"encode {eff.get('timing_image', '')}, {p}" for p in t]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e, steps in eff["efforts"].items():
        bd = eff["bd_rate_vs_effort1"].get(e)
        cells = [e + (" (default)" if int(e) == eff["default_effort"] else ""), str(steps),
                 "-" if e == "1" else (f"{bd:+.1f}%" if bd is not None else "undefined")]
        for p in (presets[0], "default", presets[-1]):
            r = eff["rungs"][p][e]
            cells.append(f"{r['bpp']:.4f} / {r['mean_psnr']:.2f}")
        for p, secs in t.items():
            cells.append(f"{secs[e]:.1f} s ({secs[e] / secs['1']:.1f}x)")
        rows.append("| " + " | ".join(cells) + " |")
    why = []
    if eff.get("models") != current_models(presets):
        why.append("earlier models than the installed ones")
    lr, steps = search_schedule()
    if eff.get("lr") != lr:
        why.append("an earlier search schedule")
    if eff.get("efforts") != steps:
        why.append("other gradient steps per effort")
    listed = " and ".join(filter(None, [", ".join(why[:-1]), why[-1]])) if why else ""
    stale = f" Measured with {listed} (not rerun since)." if why else ""
    return "\n".join(rows) + (f"\n\n{eff['dataset']}, {eff['images']} images, all {len(presets)} rungs; BD-rate over the rungs' "
                               "points (mean bpp against mean PSNR); negative: fewer bytes at equal PSNR." + stale)


def search_schedule() -> tuple[dict, dict]:
    """The installed search's (learning rates, steps per effort), as result files record them."""
    from bsqcodec.codec import search

    return search.schedule(), search.steps()


def current_models(presets) -> dict:
    """Preset name -> hash of the installed model, as the result files record them."""
    from bsqcodec.model import weights

    return {p: weights.preset(p).hash_hex for p in presets}


def ladder_table(bench: dict) -> str:
    """The README's quality table: one row per rung that the bench ran."""
    from bsqcodec.config import LADDER, RUNG_NAMES
    from bsqcodec.model.weights import installed_configs

    configs = {c.name: c for c in LADDER}
    inst = installed_configs()
    rows = ["| `-q` | preset | token bits (groups) | Kodak bpp | Kodak PSNR (dB) | MS-SSIM | `bsqc decode` 768x512, 2 cores: AVX-512 | AVX2 |",
            "|---|---|---|---|---|---|---|---|"]
    for q, name in enumerate(RUNG_NAMES, 1):
        t = bench["totals"].get(name)
        if t is None:
            continue
        decs = []
        for suffix in ("", "-avx2"):  # bsqc decode as a whole process, net of imports (decode_load.py)
            dl = load(f"decode-load-{name}{suffix}.json")
            stale = dl and dl.get("model") not in (None, bench["models"].get(name))  # older files name no model
            decs.append(f"{dl['net_idle_best']:.2f} s" + (" (an earlier model)" if stale else "") if dl else "-")
        if name in configs:
            bits = f"{configs[name].tokenizer.bits} ({configs[name].prior.groups})"
        else:  # a second-stage rung: its first stage's tokens, then up to L2 bits per P2 x P2 token
            sc = inst[name]
            fc = configs[sc.base]
            bits = (f"{fc.tokenizer.bits} ({fc.prior.groups}), then 0-{sc.residual.bits} per "
                    f"{sc.residual.patch}x{sc.residual.patch} (lambda {sc.lam})")
        rows.append(f"| {q} | {name} | {bits} | {t['bpp']:.3f} | {t['mean_psnr']:.2f} | "
                    f"{t['mean_ms_ssim']:.4f} | {' | '.join(decs)} |")
    bd = ", ".join(f"{c.upper()} {v:+.1f}%" if v is not None else f"{c.upper()} undefined ({_why(bench, c)})"
                   for c, v in bench["bd_rate_psnr"].items())
    note = (f"\n\nMeasured by `bsqc bench` at encoder effort {bench.get('effort', 1)}; decoding kodim01 as a whole "
            "process net of importing its libraries (best of 5, `benchmarks/decode_load.py`; AVX2: emulated on an "
            "AVX-512 processor, see benchmarks/README.md).")
    return "\n".join(rows) + note + (f" BD-rate (PSNR) of the ladder on Kodak: {bd} (negative: fewer bits than that codec; "
                                      "[benchmarks/README.md](benchmarks/README.md))." if bd else "")


def main() -> None:
    bench = load("bench-kodak.json")
    top = HERE.parent / "README.md"
    s = top.read_text()
    s = re.sub(r"(<!-- ladder:begin -->\n).*?(<!-- ladder:end -->)", lambda m: m.group(1) + ladder_table(bench) + "\n" + m.group(2),
               s, flags=re.S)
    eff = load("effort-kodak.json")
    if eff:
        s = re.sub(r"(<!-- effort:begin -->\n).*?(<!-- effort:end -->)", lambda m: m.group(1) + effort_table(eff) + "\n" + m.group(2),
                   s, flags=re.S)
    top.write_text(s)
    readme = HERE / "README.md"
    s = readme.read_text()
    section = results_section(bench)
    for name in ("cbsd68", "mcmaster"):
        other = load(f"bench-{name}.json")
        if other and all(bench["models"].get(p) == h for p, h in other["models"].items()):  # the installed rungs it ran
            section += "\n" + other_dataset_section(other)
    if eff:
        section += ("\n### Encoder effort (`results/effort-kodak.json`, `effort.py`)\n\n" + effort_table(eff)
                    + f" Whole run (search and coding of every effort): {eff['search_seconds_total'] / 60:.0f} minutes.\n")
    section += "\n" + robustness_section()
    s = re.sub(r"(<!-- results:begin[^>]*-->\n).*?(<!-- results:end -->)", lambda m: m.group(1) + section + "\n" + m.group(2),
               s, flags=re.S)
    readme.write_text(s)
    card = CARD.read_text()
    for preset in bench["totals"]:
        line = kodak_line(preset, bench) if load(f"kodak-{preset}.json") else bench_line(preset, bench)
        card = re.sub(rf"(<!-- kodak:{preset} -->).*?(<!-- /kodak -->)", lambda m: m.group(1) + line + m.group(2), card, flags=re.S)
    CARD.write_text(card)


if __name__ == "__main__":
    main()
