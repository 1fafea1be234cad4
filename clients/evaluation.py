"""The outputs of an evaluation, shared by ``ddpo eval``, ``ddpo score --images`` and the trainer's held-out
evaluation: ``results.jsonl`` (one line per image), ``summary.json`` (statistics per reward and variant) and
``report.html`` (one static page: settings, statistics, histograms, the images with their scores).

Standard library and numpy only, so that ``ddpo score`` writes them with the light client installed.

A *variant* is one model being evaluated ("base", a LoRA's label, a training epoch, or "images" for a folder of
files). With two variants, the first is the reference and the second the candidate: the report shows them side by
side (reference | candidate) with the candidate's score minus the reference's, and ``summary.json`` has the paired
differences.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import html
import importlib.resources
import json
import math
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from clients.errors import RewardServiceError

if TYPE_CHECKING:
    from clients.types import ItemResult

RESULTS_FILE, SUMMARY_FILE, REPORT_FILE = "results.jsonl", "summary.json", "report.html"
STAT_KEYS = ("count", "failed", "mean", "std", "min", "q25", "median", "q75", "max")
_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


@dataclasses.dataclass
class ImageRecord:
    """One image and what every reward said about it: a line of results.jsonl."""

    variant: str
    prompt: str | None
    prompt_index: int | None  # rows of the report; None for an image without a prompt
    sample: int | None  # which sample of its prompt
    seed: int | None  # the seed of this image's own generator (None: not sampled from its own seed)
    image: str  # path relative to the output folder, with "/" separators
    rewards: dict[str, float | None] = dataclasses.field(default_factory=dict)  # None: the item failed
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # "CODE: message", failed rewards only
    components: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    info: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    def add_result(self, reward: str, result: ItemResult) -> None:
        """Record one reward's answer for this image: its score, or its error (never a number)."""
        if result.ok:
            self.rewards[reward] = float(result.score)
            if result.components:
                self.components[reward] = dict(result.components)
            if result.info:
                self.info[reward] = dict(result.info)
        else:
            self.add_error(reward, f"{result.code.name}: {result.message}")

    def add_error(self, reward: str, error: str) -> None:
        """Record that ``reward`` has no score for this image, and why ("CODE: message")."""
        self.rewards[reward] = None
        self.errors[reward] = error

    def to_json(self) -> dict[str, Any]:
        """The results.jsonl line: errors, components and info only where they are not empty."""
        line: dict[str, Any] = {
            "variant": self.variant,
            "prompt": self.prompt,
            "prompt_index": self.prompt_index,
            "sample": self.sample,
            "seed": self.seed,
            "image": self.image,
            "rewards": self.rewards,
        }
        for key in ("errors", "components", "info"):
            if value := getattr(self, key):
                line[key] = value
        return line

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> ImageRecord:
        """The record of a results.jsonl line (``to_json``'s inverse)."""
        optional = {key: line[key] for key in ("errors", "components", "info") if key in line}
        fields = ("variant", "prompt", "prompt_index", "sample", "seed", "image", "rewards")
        return cls(**{key: line[key] for key in fields}, **optional)


def call_error(error: RewardServiceError) -> str:
    """The "CODE: message" recorded on the items of a call that failed as a whole."""
    return f"{error.code.name}: {error.message}"


def parse_reward_list(text: str) -> list[str]:
    """ "a,b" -> ["a", "b"]; ValueError for an empty name or a repeated one."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(f"reward list {text!r} has an empty name: use comma-separated names, e.g. a,b")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"reward list {text!r} names {', '.join(repeated)} more than once")
    return names


def now() -> str:
    """The ``created`` timestamp of the settings: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def evaluation_settings(command: str, rewards: Sequence[str], reward_server: str, **details: Any) -> dict[str, Any]:
    """The settings at the top of summary.json and report.html, in the same order for every command: the command,
    what it evaluated and how (``details``), the rewards, the service and the time."""
    return {"command": command, **details, "rewards": list(rewards), "reward_server": reward_server, "created": now()}


# ---------------------------------------------------------------------------------------------------- statistics


def _variants(records: Sequence[ImageRecord]) -> list[str]:
    return list(dict.fromkeys(record.variant for record in records))


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def stats(scores: Sequence[float | None]) -> dict[str, Any]:
    """count (scored items), failed, and mean, std (population, ddof=0), min, q25, median, q75, max of the scored
    ones (numpy's linear percentiles); null when nothing was scored."""
    values = np.array([s for s in scores if s is not None], dtype=np.float64)
    out: dict[str, Any] = {"count": len(values), "failed": len(scores) - len(values)}
    if not len(values):
        return out | {key: None for key in STAT_KEYS[2:]}
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return out | {
        "mean": _finite(values.mean()),
        "std": _finite(values.std()),
        "min": _finite(values.min()),
        "q25": _finite(q25),
        "median": _finite(median),
        "q75": _finite(q75),
        "max": _finite(values.max()),
    }


def _pairs(records: Sequence[ImageRecord], reference: str, candidate: str) -> list[tuple[ImageRecord, ImageRecord]]:
    """The images of two variants with the same prompt index and sample (the same seed in ``ddpo eval``)."""
    by_key: dict[tuple[int | None, int | None], ImageRecord] = {
        (r.prompt_index, r.sample): r for r in records if r.variant == reference and r.prompt_index is not None
    }
    return [
        (by_key[(r.prompt_index, r.sample)], r)
        for r in records
        if r.variant == candidate and (r.prompt_index, r.sample) in by_key
    ]


def summarize(records: Sequence[ImageRecord], rewards: Sequence[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    """What summary.json holds: the settings, per reward and variant the statistics (``stats``), per prompt each
    variant's mean per reward, and with two variants the paired differences (candidate minus reference)."""
    variants = _variants(records)
    summary: dict[str, Any] = {
        "settings": dict(settings),
        "variants": variants,
        "images": len(records),
        "rewards": {
            reward: {v: stats([r.rewards.get(reward) for r in records if r.variant == v]) for v in variants}
            for reward in rewards
        },
    }
    prompts: dict[int, str | None] = {}
    for record in records:
        if record.prompt_index is not None:
            prompts.setdefault(record.prompt_index, record.prompt)
    per_prompt = []
    for index in sorted(prompts):
        means: dict[str, dict[str, float | None]] = {}
        for reward in rewards:
            means[reward] = {}
            for variant in variants:
                mine = [r.rewards.get(reward) for r in records if r.variant == variant and r.prompt_index == index]
                scored = [s for s in mine if s is not None]
                means[reward][variant] = _finite(float(np.mean(scored))) if scored else None
        per_prompt.append({"prompt_index": index, "prompt": prompts[index], "mean": means})
    summary["per_prompt"] = per_prompt
    if len(variants) == 2:
        reference, candidate = variants
        pairs = _pairs(records, reference, candidate)
        comparison: dict[str, Any] = {"reference": reference, "candidate": candidate, "rewards": {}}
        for reward in rewards:
            diffs = np.array(
                [
                    b.rewards[reward] - a.rewards[reward]  # type: ignore[operator]
                    for a, b in pairs
                    if a.rewards.get(reward) is not None and b.rewards.get(reward) is not None
                ],
                dtype=np.float64,
            )
            comparison["rewards"][reward] = {
                "pairs": len(diffs),
                "mean_difference": _finite(diffs.mean()) if len(diffs) else None,
                "higher": int((diffs > 0).sum()),
                "lower": int((diffs < 0).sum()),
                "equal": int((diffs == 0).sum()),
            }
        summary["comparison"] = comparison
    return summary


# ---------------------------------------------------------------------------------------------------- files


def write_evaluation(
    out_dir: Path, records: Sequence[ImageRecord], rewards: Sequence[str], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Write results.jsonl, summary.json and report.html into ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(record.to_json(), allow_nan=False) + "\n" for record in records)
    (out_dir / RESULTS_FILE).write_text(lines, encoding="utf-8")
    summary = summarize(records, rewards, settings)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / REPORT_FILE).write_text(render_report(records, rewards, summary), encoding="utf-8")
    return summary


def read_results(path: Path) -> list[dict[str, Any]]:
    """The lines of a results.jsonl file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------- report

# The report's page skeleton, CSS, script and histogram frame are package data in clients/report/ (kept as files so
# that they read and lint as what they are); every page inlines them, so report.html stays one self-contained file.


@functools.cache
def _asset(name: str) -> str:
    """A file of clients/report/, read once per process."""
    return (importlib.resources.files("clients") / "report" / name).read_text(encoding="utf-8")


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _settings_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _stats_table(reward: str, summary: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{_esc(key)}</th>" for key in STAT_KEYS)
    rows = []
    for variant, values in summary["rewards"][reward].items():
        cells = "".join(
            f"<td>{values[key]}</td>" if key in ("count", "failed") else f"<td>{_number(values[key])}</td>"
            for key in STAT_KEYS
        )
        rows.append(f"<tr><td class='variant'>{_esc(variant)}</td>{cells}</tr>")
    table = f"<table><tr><th>variant</th>{head}</tr>{''.join(rows)}</table>"
    comparison = summary.get("comparison")
    if comparison is not None:
        c = comparison["rewards"][reward]
        table += (
            f"<p>{_esc(comparison['candidate'])} − {_esc(comparison['reference'])}, paired by prompt and seed: "
            f"mean difference {_number(c['mean_difference'])} over {c['pairs']} pairs "
            f"(higher {c['higher']}, lower {c['lower']}, equal {c['equal']})</p>"
        )
    return table


def histogram_svg(reward: str, scores: Mapping[str, Sequence[float]], width: int = 640, height: int = 230) -> str:
    """An inline SVG histogram of each variant's scores on shared bins, the variants' bars side by side in each bin,
    with axes, tick labels, axis labels and a legend. The frame is clients/report/histogram.svg; the bars, legend
    and ticks are computed here."""
    every = np.array([s for values in scores.values() for s in values], dtype=np.float64)
    if not len(every):
        return f"<p>No {_esc(reward)} scores to plot.</p>"
    bins = int(min(20, max(1, math.ceil(math.sqrt(len(every))))))
    edges = np.histogram_bin_edges(every, bins=bins)
    counts = {v: np.histogram(np.asarray(values, dtype=np.float64), edges)[0] for v, values in scores.items()}
    left, right, top, bottom = 52, 170, 12, 44  # the legend goes on the right
    plot_w, plot_h = width - left - right, height - top - bottom
    axis_y = top + plot_h
    peak = max(1, max(int(c.max()) for c in counts.values()))
    bin_w = plot_w / bins
    bar_w = bin_w / max(1, len(counts))
    legend_x = left + plot_w + 24
    bars, legend, ticks = [], [], []
    for k, (variant, values) in enumerate(counts.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        for i, count in enumerate(values):
            if not count:
                continue
            bar_h = plot_h * count / peak
            x, y = left + i * bin_w + k * bar_w, axis_y - bar_h
            bars.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{bar_h:.1f}" '
                f'fill="{colour}"><title>{_esc(variant)}: [{edges[i]:.4g}, {edges[i + 1]:.4g}]: {count} images'
                "</title></rect>"
            )
        legend.append(
            f'<rect x="{legend_x}" y="{4 + 14 * k}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{13 + 14 * k}">{_esc(variant)}</text>'
        )
    for value in range(0, peak + 1, math.ceil(peak / 4)):
        y = axis_y - plot_h * value / peak
        ticks.append(
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#222"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value}</text>'
        )
    for fraction in (0.0, 0.5, 1.0):
        x = left + plot_w * fraction
        value = edges[0] + (edges[-1] - edges[0]) * fraction
        ticks.append(
            f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#222"/>'
            f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{value:.4g}</text>'
        )
    return string.Template(_asset("histogram.svg")).substitute(
        reward=_esc(reward),
        width=width,
        height=height,
        left=left,
        top=top,
        axis_y=axis_y,
        plot_right=left + plot_w,
        label_x=f"{left + plot_w / 2:.1f}",
        label_y=height - 6,
        middle_y=f"{top + plot_h / 2:.1f}",
        bars="".join(bars),
        legend="".join(legend),
        ticks="".join(ticks),
    )


def _figure(record: ImageRecord, rewards: Sequence[str], show_variant: bool) -> str:
    lines = []
    if show_variant:
        lines.append(f"<span class='variant'>{_esc(record.variant)}</span>")
    lines.append(f"seed {record.seed}" if record.seed is not None else _esc(record.image.rsplit("/", 1)[-1]))
    for reward in rewards:
        if reward in record.errors:
            lines.append(f"<span class='err'>{_esc(reward)}: {_esc(record.errors[reward])}</span>")
        elif reward in record.rewards:
            lines.append(f"{_esc(reward)}: {_number(record.rewards[reward])}")
    alt = f"{record.variant}: {record.prompt or record.image}"
    return (
        f"<figure><img src='{_esc(quote(record.image, safe='/'))}' alt='{_esc(alt)}' loading='eager'>"
        f"<figcaption>{'<br>'.join(lines)}</figcaption></figure>"
    )


def _difference(a: ImageRecord, b: ImageRecord, rewards: Sequence[str]) -> str:
    parts = []
    for reward in rewards:
        before, after = a.rewards.get(reward), b.rewards.get(reward)
        if before is None or after is None:
            parts.append(f"Δ {_esc(reward)}: –")
        else:
            delta = after - before
            css = "up" if delta > 0 else "down" if delta < 0 else ""
            parts.append(f"<span class='{css}'>Δ {_esc(reward)}: {delta:+.4g}</span>")
    return "<div>" + "<br>".join(parts) + "</div>"


def _grid(records: Sequence[ImageRecord], rewards: Sequence[str]) -> str:
    variants = _variants(records)
    keyed: dict[int, dict[int | None, dict[str, ImageRecord]]] = {}
    loose = []
    for record in records:
        if record.prompt_index is None:
            loose.append(record)
        else:
            keyed.setdefault(record.prompt_index, {}).setdefault(record.sample, {})[record.variant] = record
    parts = []
    for index in sorted(keyed):
        samples = keyed[index]
        prompt = next(iter(next(iter(samples.values())).values())).prompt
        parts.append(f"<h3>{index}: {_esc(prompt)}</h3><div class='row'>")
        for sample in sorted(samples, key=lambda s: -1 if s is None else s):
            by_variant = samples[sample]
            if len(variants) == 1:
                parts.append(_figure(by_variant[variants[0]], rewards, show_variant=False))
                continue
            figures = "".join(_figure(by_variant[v], rewards, True) for v in variants if v in by_variant)
            diff = ""
            if len(variants) == 2 and all(v in by_variant for v in variants):
                diff = _difference(by_variant[variants[0]], by_variant[variants[1]], rewards)
            parts.append(f"<div class='pair'><div class='images'>{figures}</div>{diff}</div>")
        parts.append("</div>")
    if loose:
        parts.append("<h3>Images without a prompt</h3><div class='row'>")
        parts.extend(_figure(record, rewards, show_variant=len(variants) > 1) for record in loose)
        parts.append("</div>")
    return "".join(parts)


def render_report(records: Sequence[ImageRecord], rewards: Sequence[str], summary: Mapping[str, Any]) -> str:
    """report.html: one self-contained page (no external CSS, scripts or fonts; images by relative path), the
    skeleton clients/report/report.html with report.css and report.js inlined."""
    settings = summary["settings"]
    variants = summary["variants"]
    rows = "".join(
        f"<tr><td>{_esc(key)}</td><td>{_esc(_settings_value(value))}</td></tr>" for key, value in settings.items()
    )
    sections = []
    for reward in rewards:
        scores = {
            v: [s for r in records if r.variant == v and (s := r.rewards.get(reward)) is not None] for v in variants
        }
        sections.append(f"<h2>{_esc(reward)}</h2>{_stats_table(reward, summary)}{histogram_svg(reward, scores)}")
    layout = ""
    if len(variants) == 2:
        layout = (
            f"<p>Each pair shows {_esc(variants[0])} | {_esc(variants[1])} from the same seed; Δ is "
            f"{_esc(variants[1])} minus {_esc(variants[0])}.</p>"
        )
    return string.Template(_asset("report.html")).substitute(
        title=_esc(f"DDPO evaluation: {', '.join(variants)}"),
        style=_asset("report.css"),
        script=_asset("report.js"),
        images=summary["images"],
        settings_rows=rows,
        sections="".join(sections),
        layout=layout,
        grid=_grid(records, rewards),
    )
