"""The printed table: machine, headline ratios against their targets, key absolute numbers."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    fmt = lambda r: "|".join(f" {c:<{w}} " for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), line, *map(fmt, rows)])


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"python -m bench ({result['mode']}) — {result['finished']} — {result['duration_s']:.0f} s "
             f"(of which building random-weight checkpoints {result.get('model_build_s', 0):.0f} s)",
             f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
             f"ultralytics {m['ultralytics']}, device {m['device']}, load avg at start {m['loadavg_at_start']}, "
             f"at end {result.get('loadavg_at_end')}",
             "FastSAM and SAM weights are random (timing only; speed does not depend on weight values).", ""]
    rows = []
    for name, section in result["sections"].items():
        status = section.get("status")
        if status != "ok":
            why = section.get("error") or section.get("skipped") or ""
            rows.append([name, status or "?", "-", "-", "-", why[:70]])
            continue
        head = section.get("headline")
        if not head:
            rows.append([name, "ok", "-", "-", "-", "(no headline figure)"])
            continue
        met = {True: "MET", False: "MISSED", None: "-"}[head.get("met")]
        rows.append([name, met, f"{_fmt(head['value'])} {head['unit']}", head["target"], head["name"],
                     head.get("absolute", "")])
    lines.append(_table(rows, ["section", "target", "value", "target is", "figure", "absolute"]))
    extra = _extras(result["sections"])
    if extra:
        lines += ["", *extra]
    lines += ["", f"JSON: {result['out']}"]
    return "\n".join(lines)


def _extras(sections: dict[str, Any]) -> list[str]:
    """A few secondary figures worth seeing without opening the JSON."""
    out = []
    cold = sections.get("cold", {})
    for name, fig in cold.get("fastsam", {}).items():
        out.append(f"cold FastSAM-{name}: total p50 {fig['total']['p50_ms']:.0f} ms (decode "
                   f"{fig['decode']['p50_ms']:.0f} + segment {fig['segment']['p50_ms']:.0f} + encode "
                   f"{fig['encode_entry']['p50_ms']:.0f}), {fig['instances']} instances"
                   + (" | ultralytics split: " + ", ".join(f"{k} {v:.0f}" for k, v in fig["segment_phases"].items())
                      if fig.get("segment_phases") else ""))
    warm = sections.get("warm", {})
    if "http" in warm:
        lat = warm["http"]["latency"]
        out.append(f"warm click over HTTP: p50 {lat['p50_ms']:.1f} / p95 {lat['p95_ms']:.1f} / p99 "
                   f"{lat['p99_ms']:.1f} ms over {lat['n']} prompts, {warm['cached_instances']} cached masks, "
                   f"body {warm['http']['request_body_bytes']['median'] / 1e6:.2f} MB")
        if app := warm["http"].get("server_app_time"):
            out.append(f"  of which inside the app (Server-Timing): p50 {app['p50_ms']:.1f} / p95 "
                       f"{app['p95_ms']:.1f} ms; the rest is gunicorn, the socket and the client")
        for key, label in (("speedup_vs_nocache_fastsam", "FastSAM predictor per click (no cache)"),
                           ("speedup_vs_sam_decoder", "SAM ViT-B decoder per click")):
            if warm.get(key):
                out.append(f"  {warm[key]}x faster than {label}")
        stages = warm.get("profile", {}).get("stages")
        if stages:
            out.append("  in-process stages p50 (ms): " + ", ".join(
                f"{k} {v.get('p50_ms', 0):.2f}" for k, v in stages.items()))
        out += _warm_split(warm)
    out += _issue16(sections)
    tp = sections.get("throughput", {}).get("settings", {})
    for name, fig in tp.items():
        out.append(f"throughput {name}: {fig['images_per_minute']} images/min, "
                   f"peak RSS {fig['max_worker_peak_rss_mb']} MiB/worker, {fig['regions_per_image_mean']} regions")
    queue = sections.get("queue", {})
    if "one" in queue:
        line = (f"queue: warm job p50 {queue['one']['job']['p50_ms']:.0f} ms in a worker vs bare segment "
                f"{queue['bare_forward']['p50_ms']:.0f} ms (1 core) = {queue['job_over_bare_forward']}x; "
                f"1 worker {queue['one']['images_per_minute']} img/min")
        if "two" in queue:
            line += (f", 2 workers (1 core each) {queue['two']['images_per_minute']} img/min = efficiency "
                     f"{queue['scaling_efficiency']}; enqueue -> cached ({queue['images']} images): "
                     f"{queue['one']['enqueue_to_cached_s']} s / {queue['two']['enqueue_to_cached_s']} s")
        out.append(line)
    ov = sections.get("onnx", {}).get("runs", {}).get("openvino", {})
    if "segment" in ov:
        out.append(f"openvino {ov['openvino']}: everything pass p50 {ov['segment']['p50_ms']:.0f} ms = "
                   f"{ov['speedup_vs_torch']}x torch, min mask IoU {ov['agreement']['mask_iou_min']}")
    elif ov:
        out.append(f"openvino: {ov.get('skipped') or ov.get('error')}")
    redis = sections.get("cache", {}).get("redis", {})
    if "extrapolated_1000_images_mb" in redis:
        out.append(f"redis: {redis['memory_usage_per_image_bytes'] / 1024:.0f} KiB per cached image -> "
                   f"~{redis['extrapolated_1000_images_mb']} MiB per 1,000 images (extrapolated from "
                   f"{redis['sample_entries']})")
    return out


def _warm_split(warm: dict[str, Any]) -> list[str]:
    """Every millisecond of the warm click, p50: app (Server-Timing) + transport floor + the rest."""
    floors = warm.get("transport", {}).get("floors", {})
    app, lat = warm["http"].get("server_app_time"), warm["http"]["latency"]
    out = []
    if floors:
        out.append("  transport floor (trivial app under gunicorn, same bodies and client) p50/p95 ms: " + ", ".join(
            f"{k} {v['latency']['p50_ms']:.1f}/{v['latency']['p95_ms']:.1f}" for k, v in floors.items()))
    gthread = floors.get("gthreadx4", {}).get("latency")
    if app and gthread:
        rest = lat["p50_ms"] - app["p50_ms"] - gthread["p50_ms"]
        out.append(f"  warm p50 {lat['p50_ms']:.1f} ms = app {app['p50_ms']:.1f} + transport {gthread['p50_ms']:.1f}"
                   f" + unexplained {rest:.1f} (scheduling: client, server and other load share the cores)")
    return out


def _issue16(sections: dict[str, Any]) -> list[str]:
    """MobileSAM, int8 and clicks-under-concurrency lines."""
    out = []
    mob = sections.get("mobilesam", {})
    if "cold" in mob:
        click, enc = mob["click"], mob["cold"]["decode_plus_set_image"]
        out.append(f"MobileSAM (random weights): decode+encoder p50 {enc['p50_ms']:.0f} ms; per click predict "
                   f"{click['predict']['p50_ms']:.0f} + SDK RLE {click['sdk_rle']['p50_ms']:.1f} = p50 "
                   f"{click['per_click']['p50_ms']:.0f} / p95 {click['per_click']['p95_ms']:.0f} ms; ours faster: "
                   + ", ".join(f"{k} {v}x" for k, v in mob.get("fastsam_speedup_vs_mobilesam", {}).items()))
    q = sections.get("int8", {})
    if "cold" in q:
        out.append(f"cold@{q['imgsz']} p50 (decode+segment+encode) vs MobileSAM decode+encoder "
                   f"{q['mobilesam_decode_plus_encoder']['p50_ms']:.0f} ms: " + ", ".join(
                       f"{k} {v['total']['p50_ms']:.0f} ms ({q['speedup_vs_mobilesam_encoder'][k]}x)"
                       for k, v in q["cold"].items())
                   + f"; int8 vs fp32 masks (random weights) min IoU "
                     f"{q['agreement_int8_vs_fp32_random_weights']['mask_iou_min']}")
    c = sections.get("clicks", {})
    for name, fig in c.get("median", {}).items():
        out.append(f"clicks, {c['clients']} clients, 1 worker x {c['threads']} threads, {name}"
                   f"{' ' + c['base_commit'][:10] if name == 'base' and c.get('base_commit') else ''}: "
                   f"{fig['clicks_per_s']} clicks/s, p50 {fig['latency']['p50_ms']:.1f} / p99 "
                   f"{fig['latency']['p99_ms']:.1f} ms")
    return out
