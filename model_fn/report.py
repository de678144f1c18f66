"""The evaluation report as charts and one HTML page (library; called by model_fn.evaluate).

The charts and curves are numpy + matplotlib (Agg backend); only the table's column names come
from ``model_fn.evaluation``.

``write_report(output_dir, report, predictions)`` writes into ``output_dir``:

- ``roc_<task>.png``: ROC curves of every model on one set of axes, per task, with the AUC in the
  legend -- ``ctr`` (all impressions, label click), ``ctcvr`` (all impressions, label click AND
  conversion, score pCTCVR), ``cvr_clicked`` (clicked impressions, label conversion) and, when
  the data has ground truth, ``cvr_all_vs_truth`` (all impressions, label the counterfactual
  conversion);
- ``reliability_<task>.png``: reliability (calibration) diagram per task on log-log axes, since
  CVR and CTCVR probabilities are tiny, with the distribution of the predictions underneath;
- ``gates_<model>.png`` (file-safe name): mean MMoE gate weight per task and expert, for models with gates
  (``predictions[name]["gates"]``, else the ``gate/<task>/expert_<i>`` keys of ``report``);
- ``index.html``: the metrics table (``report``, as returned by ``model_fn.evaluation.evaluate``)
  and the charts with captions, linked by relative path.

``predictions[name]`` holds aligned 1-D arrays ``label_click``, ``label_conversion``, ``ctr``,
``cvr``, optionally ``ctcvr`` (default ctr * cvr, ESMM's structure; MMoE predicts it as a task of
its own), optionally ``counterfactual_conversion`` (true conversion of every impression, synthetic
data) and optionally ``gates`` (task -> mean gate weight per expert, shape [num_experts]).
"""

import html
import os
import re
import tempfile
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from model_fn.evaluation import COLUMNS  # noqa: E402

ORACLE = "oracle"
ROC_POINTS = 2000      # points drawn per ROC curve (exact at each of them)
DPI = 120
COUNT_KEYS = ("examples", "clicks", "conversions")

# (task, chart title); the rows, labels and scores of each task come from ``_task_data``.
TASKS = (
    ("ctr", "CTR: all impressions, label click"),
    ("ctcvr", "CTCVR: all impressions, label click and conversion"),
    ("cvr_clicked", "CVR: clicked impressions, label conversion"),
    ("cvr_all_vs_truth", "CVR: all impressions, label true (counterfactual) conversion"),
)

Arrays = Dict[str, np.ndarray]
Styles = Dict[str, Dict[str, object]]
Curve = Tuple[str, np.ndarray, np.ndarray, float, int, int]  # model, fpr, tpr, AUC, positives, negatives
Entry = Tuple[str, Arrays, np.ndarray, np.ndarray, float]     # model, bins, predictions, weights, calibration


def _as_arrays(labels, scores, weights=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flat float64 labels, scores and weights of the rows with weight > 0; checks shapes and values."""
  y = np.asarray(labels, np.float64).ravel()
  s = np.asarray(scores, np.float64).ravel()
  w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64).ravel()
  if not (y.shape == s.shape == w.shape):
    raise ValueError(f"labels, scores and weights differ in length: {y.shape}, {s.shape}, {w.shape}")
  keep = w > 0
  y, s, w = y[keep], s[keep], w[keep]
  if not np.all((y == 0) | (y == 1)):
    raise ValueError("labels must be 0 or 1")
  if not np.all(np.isfinite(s)):
    raise ValueError("scores must be finite")
  return y, s, w


def _sorted(labels, scores, weights=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``_as_arrays`` in increasing order of score: the one sort the ROC curve and the bins share."""
  y, s, w = _as_arrays(labels, scores, weights)
  order = np.argsort(s)
  return y[order], s[order], w[order]


def roc_curve(labels, scores, weights=None) -> Tuple[np.ndarray, np.ndarray]:
  """Exact ROC curve: false and true positive rates at every distinct score threshold.

  Tied scores form one threshold, so the trapezoidal area under (fpr, tpr) is the AUC with
  ties counted one half. ``weights`` selects rows (0 = left out, e.g. CVR on clicked rows only)
  and weighs them otherwise. Starts at (0, 0) and ends at (1, 1); raises ValueError without
  both classes.
  """
  return _roc_of_sorted(*_sorted(labels, scores, weights))


def _roc_of_sorted(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """``roc_curve`` of rows sorted by increasing score."""
  if len(s) == 0:
    raise ValueError("no rows with weight > 0")
  # Thresholds from the highest score down; the last row of each group of tied scores gives
  # one point per threshold.
  y, s, w = y[::-1], s[::-1], w[::-1]
  last = np.concatenate([np.flatnonzero(np.diff(s)), [len(s) - 1]])
  tp = np.cumsum(w * y)[last]
  fp = np.cumsum(w * (1 - y))[last]
  if tp[-1] <= 0 or fp[-1] <= 0:
    raise ValueError("the ROC curve needs both positives and negatives")
  return np.concatenate([[0.0], fp / fp[-1]]), np.concatenate([[0.0], tp / tp[-1]])


def _thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = ROC_POINTS) -> Tuple[np.ndarray, np.ndarray]:
  """At most about ``max_points`` points of the curve, evenly spaced along its length, ends kept."""
  if len(x) <= max_points:
    return x, y
  length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
  idx = np.searchsorted(length, np.linspace(0.0, length[-1], max_points))
  idx = np.unique(np.concatenate([[0], np.minimum(idx, len(x) - 1), [len(x) - 1]]))
  return x[idx], y[idx]


def reliability_bins(labels, probs, weights=None, num_bins: int = 15,
                     strategy: str = "quantile") -> Dict[str, np.ndarray]:
  """Mean predicted probability and observed rate per bin of predictions (non-empty bins only).

  ``strategy="quantile"``: bins of (nearly) equal weight by rank of the prediction, tied
  predictions kept in one bin -- the right choice for tiny CVR probabilities, which all fall in
  the first bin of a uniform grid. ``strategy="uniform"``: ``num_bins`` equal widths on [0, 1].
  Returns ``mean_predicted``, ``observed_rate``, ``count`` (summed weight) and ``positives``
  (summed weight of positives) per bin, in order of increasing prediction.
  """
  if strategy not in ("quantile", "uniform"):
    raise ValueError(f"unknown strategy {strategy!r}; use 'quantile' or 'uniform'")
  arrays = _sorted(labels, probs, weights) if strategy == "quantile" else _as_arrays(labels, probs, weights)
  return _bins_of(*arrays, num_bins=num_bins, strategy=strategy)


def _bins_of(y: np.ndarray, p: np.ndarray, w: np.ndarray, num_bins: int, strategy: str) -> Arrays:
  """``reliability_bins`` of checked arrays (sorted by increasing prediction for quantile bins)."""
  if num_bins < 1:
    raise ValueError("num_bins must be >= 1")
  if np.any((p < 0) | (p > 1)):
    raise ValueError("probabilities must be in [0, 1]")
  if strategy == "quantile":
    total = w.sum()
    weight_before = np.cumsum(w) - w
    by_rank = np.minimum((weight_before / max(total, 1e-300) * num_bins).astype(np.int64), num_bins - 1)
    # Tied predictions take the bin of the first of them.
    bins = by_rank[np.searchsorted(p, p, side="left")]
  else:
    bins = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
  count = np.bincount(bins, weights=w, minlength=num_bins)
  positives = np.bincount(bins, weights=w * y, minlength=num_bins)
  predicted = np.bincount(bins, weights=w * p, minlength=num_bins)
  keep = count > 0
  return {
      "mean_predicted": predicted[keep] / count[keep],
      "observed_rate": positives[keep] / count[keep],
      "count": count[keep],
      "positives": positives[keep],
  }


def _wilson_interval(positives: np.ndarray, count: np.ndarray,
                     z: float = 1.96) -> Tuple[np.ndarray, np.ndarray]:
  """95% Wilson score interval of a rate (bounds stay in [0, 1], sensible for rare events)."""
  n = np.maximum(count, 1e-12)
  rate = positives / n
  centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
  return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def _task_data(task: str, pred: Arrays) -> Optional[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]:
  """(labels, scores, weights) of ``task`` from one model's predictions; None where not available."""
  click = np.asarray(pred["label_click"], np.float64).ravel()
  conversion = np.asarray(pred["label_conversion"], np.float64).ravel()
  ctr = np.asarray(pred["ctr"], np.float64).ravel()
  cvr = np.asarray(pred["cvr"], np.float64).ravel()
  if task == "ctr":
    return click, ctr, None
  if task == "ctcvr":
    ctcvr = pred.get("ctcvr")
    return click * conversion, ctr * cvr if ctcvr is None else np.asarray(ctcvr, np.float64).ravel(), None
  if task == "cvr_clicked":
    return conversion, cvr, click
  if task == "cvr_all_vs_truth":
    if pred.get("counterfactual_conversion") is None:
      return None
    return np.asarray(pred["counterfactual_conversion"], np.float64).ravel(), cvr, None
  raise ValueError(f"unknown task {task!r}")


def _model_order(report: Dict[str, Dict[str, float]], predictions: Dict[str, Arrays]) -> List[str]:
  """Models in report order, then any others with predictions; the oracle last."""
  names = list(report) + [n for n in predictions if n not in report]
  return [n for n in names if n != ORACLE] + [n for n in names if n == ORACLE]


def _styles(names: List[str]) -> Styles:
  """One colour per model, the same on every chart; the oracle (the ceiling) black and dashed."""
  palette = plt.get_cmap("tab10").colors
  styles, i = {}, 0
  for name in names:
    if name == ORACLE:
      styles[name] = {"color": "black", "linestyle": "--"}
    else:
      styles[name] = {"color": palette[i % len(palette)], "linestyle": "-"}
      i += 1
  return styles


def _file_stem(name: str, taken: set) -> str:
  stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
  candidate, i = stem, 2
  while candidate in taken:
    candidate, i = f"{stem}_{i}", i + 1
  taken.add(candidate)
  return candidate


def _plain(name: str) -> str:
  """A model name as literal matplotlib text: no mathtext, and shown in legends even with a leading _."""
  return ("\u200b" if name.startswith("_") else "") + name.replace("$", r"\$")


def _save(fig, path: str, tight: bool = False) -> None:
  """PNG at ``DPI``. ``tight`` fits the margins to the content (a second layout pass, slower);
  the ROC and reliability charts have fixed content and set their margins instead."""
  fig.savefig(path, dpi=DPI, bbox_inches="tight" if tight else None)
  plt.close(fig)


def _plot_roc(path: str, title: str, curves: List[Curve], styles: Styles) -> None:
  """Every model's ROC curve on one set of axes, the AUC in the legend."""
  fig, ax = plt.subplots(figsize=(6.0, 6.2))
  fig.subplots_adjust(left=0.12, right=0.95, bottom=0.09, top=0.9)
  ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="chance (AUC 0.5)")
  for name, fpr, tpr, auc, _, _ in curves:
    x, y = _thin_curve(fpr, tpr)
    ax.plot(x, y, linewidth=1.6, label=f"{_plain(name)} (AUC {auc:.4f})", **styles[name])
  counts = {(c[4], c[5]) for c in curves}
  if len(counts) == 1:
    positives, negatives = counts.pop()
    title = f"{title}\n{positives:,} positives, {negatives:,} negatives"
  ax.set_title(f"ROC, {title}", fontsize=10)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_aspect("equal")
  ax.grid(True, color="0.9")
  ax.legend(loc="lower right", fontsize=9)
  _save(fig, path)


def _log_formatter() -> ticker.FuncFormatter:
  return ticker.FuncFormatter(lambda v, _: f"{v:.10g}")


def _plot_reliability(path: str, title: str, entries: List[Entry], styles: Styles, num_bins: int) -> None:
  """Top: observed rate vs mean prediction per quantile bin (log-log, 95% bands); bottom: predictions."""
  # Common limits of both axes, so the diagonal is the 45-degree line: the bins and the central
  # 98% of every model's predictions (interval bounds outside are cut off).
  values = []
  for _, bins, p, w, _ in entries:
    values += [bins["mean_predicted"], bins["observed_rate"]]
    positive = p[(w > 0) & (p > 0)]
    if len(positive):
      values.append(np.quantile(positive, [0.01, 0.99]))
  values = np.concatenate(values)
  values = values[values > 0]
  high = min(float(values.max()) * 1.6, 1.0) if len(values) else 1.0
  low = min(float(values.min()) / 1.6 if len(values) else 1e-4, high / 10)

  fig, (ax, axh) = plt.subplots(2, 1, figsize=(6.0, 7.6), sharex=True,
                                gridspec_kw={"height_ratios": [3.2, 1], "hspace": 0.06})
  fig.subplots_adjust(left=0.13, right=0.95, bottom=0.075, top=0.92)
  ax.plot([low, high], [low, high], color="0.55", linestyle=":", linewidth=1.2, label="perfectly calibrated")
  edges = np.geomspace(low, high, 49)
  empty_bins = False
  for name, bins, p, w, ratio in entries:
    style = styles[name]
    x, y = bins["mean_predicted"], bins["observed_rate"]
    lo, hi = _wilson_interval(bins["positives"], bins["count"])
    ax.fill_between(x, np.maximum(lo, low), hi, color=style["color"], alpha=0.12, linewidth=0)
    seen = y > 0
    ax.plot(x[seen], y[seen], marker="o", markersize=4, linewidth=1.5,
            label=f"{_plain(name)} (calib {ratio:.3f})", **style)
    if np.any(~seen):
      empty_bins = True
      ax.plot(x[~seen], np.full(np.sum(~seen), low), linestyle="none", marker="v", markersize=8,
              markerfacecolor="none", markeredgewidth=1.4, color=style["color"], clip_on=False)
    # Equal bins of log10(p): numpy's fast path for uniform bins (no sort of the predictions).
    positive = p > 0
    share = np.histogram(np.log10(p[positive]), bins=len(edges) - 1, range=(np.log10(low), np.log10(high)),
                         weights=w[positive])[0] / max(w.sum(), 1e-300)
    axh.stairs(share, edges, linewidth=1.3, **style)
  if empty_bins:
    ax.plot([], [], linestyle="none", marker="v", markersize=8, markerfacecolor="none", color="0.3",
            label="bin without positives")
  rows = int(round(entries[0][3].sum()))
  ax.set_title(f"Reliability, {title}\n{num_bins} quantile bins of about {rows / num_bins:,.0f} rows each, "
               "shaded: 95% interval", fontsize=10)
  for a in (ax, axh):
    a.set_xscale("log")
    a.grid(True, which="major", color="0.85")
    a.grid(True, which="minor", color="0.94")
  ax.set_yscale("log")
  ax.set_xlim(low, high)
  ax.set_ylim(low, high)
  # Minor ticks at 2 and 5 per decade (labelled when the range is short): readable, and a
  # fraction of the drawing time of the default eight.
  short = high / low <= 1000
  for axis in (ax.xaxis, ax.yaxis, axh.xaxis):
    axis.set_major_formatter(_log_formatter())
    axis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(_log_formatter() if short else ticker.NullFormatter())
  for a in (ax, axh):
    # Same length for both, so major and minor labels share a baseline.
    a.tick_params(which="both", length=3.5, labelsize=8.5)
    a.tick_params(which="minor", labelcolor="0.4")
  ax.set_ylabel("observed rate")
  ax.legend(loc="upper left", fontsize=8.5)
  axh.set_xlabel("predicted probability (mean of the bin, above)")
  axh.set_ylabel("share of rows")
  axh.set_ylim(bottom=0)
  axh.yaxis.set_major_locator(ticker.MaxNLocator(3))
  _save(fig, path)


def _plot_gates(path: str, name: str, gates: Dict[str, np.ndarray]) -> np.ndarray:
  """Heatmap tasks x experts of the mean gate weights; returns the effective number of experts per task."""
  tasks = list(gates)
  matrix = np.vstack([np.asarray(gates[t], np.float64).ravel() for t in tasks])
  num_tasks, num_experts = matrix.shape
  # Effective number of experts per task: exp(entropy) of its gate weights.
  safe = np.where(matrix > 0, matrix, 1.0)
  effective = np.exp(-np.sum(matrix * np.log(safe), axis=1) / np.maximum(matrix.sum(axis=1), 1e-12))
  width = min(max(4.5, 0.75 * num_experts + 2.8), 16.0)
  fig, ax = plt.subplots(figsize=(width, max(2.6, 0.65 * num_tasks + 1.6)))
  vmax = max(float(np.nanmax(matrix)), 1e-12)
  image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
  # Values written in the cells while they fit (the colour scale tells the rest).
  fontsize = 9 if num_experts <= 16 else 7
  for i in range(num_tasks if num_experts <= 24 else 0):
    for j in range(num_experts):
      value = matrix[i, j]
      ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize,
              color="white" if value < 0.6 * vmax else "black")
  ax.set_xticks(range(num_experts), [str(j) for j in range(num_experts)])
  ax.set_yticks(range(num_tasks), [f"{_plain(t)} ({e:.1f} eff.)" for t, e in zip(tasks, effective)])
  ax.set_xlabel(f"expert (uniform = {1 / num_experts:.2f})")
  ax.set_ylabel("task (effective experts)")
  ax.set_title(f"MMoE gate utilisation, {_plain(name)}: mean gate weight", fontsize=10)
  fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label("mean gate weight")
  _save(fig, path, tight=True)
  return effective


def _gates_of(name: str, report: Dict[str, Dict[str, float]],
              predictions: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  """Mean gate weight per task and expert: ``predictions[name]["gates"]``, else the report's gate keys."""
  gates = (predictions.get(name) or {}).get("gates")
  if gates:
    return {t: np.asarray(g, np.float64).ravel() for t, g in gates.items()}
  by_task: Dict[str, Dict[int, float]] = {}
  for key, value in (report.get(name) or {}).items():
    match = re.fullmatch(r"gate/(.+)/expert_(\d+)", key)
    if match and _is_number(value):
      by_task.setdefault(match.group(1), {})[int(match.group(2))] = float(value)
  return {t: np.array([w.get(e, np.nan) for e in range(max(w) + 1)]) for t, w in by_task.items()}


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _format_value(key: str, v) -> str:
  if not _is_number(v):
    return html.escape(str(v))
  if not np.isfinite(v):
    return "n/a"
  if key in COUNT_KEYS:
    return f"{v:,.0f}"
  return f"{v:.4f}"


def _best(key: str, values: Dict[str, float]) -> Optional[str]:
  """Best non-oracle model for ``key`` (AUC highest, log loss lowest, calibration nearest 1)."""
  finite = {n: v for n, v in values.items() if n != ORACLE and _is_number(v) and np.isfinite(v)}
  if len(finite) < 2:
    return None
  if key.startswith("auc/"):
    return max(finite, key=finite.get)
  if key.startswith("log_loss/"):
    return min(finite, key=finite.get)
  if key.startswith("calibration/"):
    positive = {n: v for n, v in finite.items() if v > 0}
    return min(positive, key=lambda n: abs(np.log(positive[n]))) if positive else None
  return None


def _html_table(report: Dict[str, Dict[str, float]], columns: List[Tuple[str, str]], names: List[str]) -> str:
  head = "<tr><th>model</th>" + "".join(
      f'<th title="{html.escape(k)}">{html.escape(h)}</th>' for h, k in columns) + "</tr>"
  best = {k: _best(k, {n: report[n].get(k) for n in names if k in report[n]}) for _, k in columns}
  rows = []
  for name in names:
    cells = [f'<th class="name">{html.escape(name)}</th>']
    for _, k in columns:
      if k not in report[name]:
        cells.append("<td></td>")
        continue
      text = _format_value(k, report[name][k])
      cells.append(f'<td class="best">{text}</td>' if best[k] == name else f"<td>{text}</td>")
    rows.append("<tr>" + "".join(cells) + "</tr>")
  return "<table>\n<thead>" + head + "</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; } td { text-align: right; }
thead th { background: #f4f4f4; } th.name { text-align: left; }
td.best { font-weight: bold; background: #eaf5ea; }
.grid { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; max-width: 580px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; } .note { color: #555; font-size: 0.92em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""

_PROTOCOL = (
    "Protocol of the ESMM paper. <b>CTR</b> and <b>CTCVR</b> (click and conversion; ESMM scores it "
    "with pCTR &times; pCVR) are measured over <i>all</i> impressions; <b>CVR</b> over <i>clicked</i> "
    "impressions only, the only ones whose conversion label is observed. Where the data has ground "
    "truth (synthetic data), <b>CVR all (truth)</b> measures pCVR over <i>all</i> impressions against "
    "the true counterfactual conversion of each one &ndash; the quantity ESMM is meant to improve; "
    "the <code>oracle</code> row scores the generator's true probabilities, the ceiling for any model. "
    "<b>Calibration</b> is mean prediction / observed rate (1 is calibrated, above 1 over-predicts)."
)


def _figure(src: str, alt: str, caption: str) -> str:
  src_attr = html.escape(src, quote=True)
  return (f'<figure><a href="{src_attr}"><img src="{src_attr}" alt="{html.escape(alt, quote=True)}"></a>'
          f"<figcaption>{caption}</figcaption></figure>")


def write_report(output_dir: str, report: Dict[str, Dict[str, float]],
                 predictions: Dict[str, Dict[str, np.ndarray]],
                 title: str = "Conversion-rate model evaluation", num_bins: int = 15) -> str:
  """Writes the charts (PNG) and ``index.html`` into ``output_dir`` (a local path, or a URL of a
  file system TensorFlow reads, such as gs://: drawn locally, then copied); returns the path of
  index.html."""
  if "://" not in output_dir:
    return _write_local(output_dir, report, predictions, title, num_bins)
  import tensorflow as tf
  with tempfile.TemporaryDirectory() as local:
    _write_local(local, report, predictions, title, num_bins)
    tf.io.gfile.makedirs(output_dir)
    for name in sorted(os.listdir(local)):
      tf.io.gfile.copy(os.path.join(local, name), output_dir.rstrip("/") + "/" + name, overwrite=True)
  return output_dir.rstrip("/") + "/index.html"


def _write_local(output_dir: str, report: Dict[str, Dict[str, float]],
                 predictions: Dict[str, Dict[str, np.ndarray]], title: str, num_bins: int) -> str:
  """write_report into a local directory.

  ``report``: model name -> metrics (``model_fn.evaluation.evaluate``); ``predictions``: model
  name -> aligned arrays (see the module docstring). Models without predictions appear only in
  the table; a task without both classes (or with non-finite predictions) for a model is left
  out of its charts, with a note on the page.
  """
  os.makedirs(output_dir, exist_ok=True)
  names = _model_order(report, predictions)
  styles = _styles(names)
  plotted = [n for n in names if n in predictions]
  for name in plotted:
    lengths = {k: np.asarray(v).size for k, v in predictions[name].items() if k != "gates" and v is not None}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"predictions of {name!r} differ in length: {lengths}")

  roc_figures, reliability_figures, gate_figures, notes = [], [], [], []
  for task, task_title in TASKS:
    curves, entries = [], []
    for name in plotted:
      data = _task_data(task, predictions[name])
      if data is None:
        continue
      try:
        y, p, w = _sorted(*data)
        fpr, tpr = _roc_of_sorted(y, p, w)
      except ValueError as e:   # one class only, or non-finite predictions: noted, not fatal
        notes.append(f"{name}, {task}: left out ({e}).")
        continue
      curves.append((name, fpr, tpr, float(np.trapz(tpr, fpr)), int(w[y > 0].sum()), int(w[y == 0].sum())))
      bins = _bins_of(y, p, w, num_bins, "quantile")
      entries.append((name, bins, p, w, float(np.sum(w * p) / np.sum(w * y))))
    if not curves:
      continue
    roc_file = f"roc_{task}.png"
    _plot_roc(os.path.join(output_dir, roc_file), task_title, curves, styles)
    roc_figures.append(_figure(roc_file, f"ROC curves, {task}", html.escape(
        f"ROC, {task_title}. AUC in the legend (exact, ties count one half); "
        "the dotted diagonal is chance.")))
    reliability_file = f"reliability_{task}.png"
    _plot_reliability(os.path.join(output_dir, reliability_file), task_title, entries, styles, num_bins)
    reliability_figures.append(_figure(reliability_file, f"Reliability diagram, {task}", html.escape(
        f"Reliability, {task_title}. Each point is one of {num_bins} bins of equal row count by "
        "predicted probability: mean prediction (x) against observed rate (y), log-log, with its 95% "
        "Wilson interval shaded; points on the dotted diagonal are calibrated, above it the model "
        "under-predicts. The lower panel shows how the predictions are spread.")))

  taken: set = set()
  for name in names:
    gates = _gates_of(name, report, predictions)
    if not gates:
      continue
    sizes = {t: np.asarray(g).size for t, g in gates.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"gates of {name!r} have different numbers of experts per task: {sizes}")
    gate_file = f"gates_{_file_stem(name, taken)}.png"
    effective = _plot_gates(os.path.join(output_dir, gate_file), name, gates)
    summary = ", ".join(f"{t} {e:.1f}" for t, e in zip(gates, effective))
    gate_figures.append(_figure(gate_file, f"Gate utilisation, {name}", html.escape(
        f"{name}: mean gate weight of each expert per task (rows sum to 1). Effective number of "
        f"experts (exp of the gate entropy) of {next(iter(sizes.values()))}: {summary}. A task that "
        "puts its weight on experts the others ignore has specialised; equal rows mean shared experts.")))

  main_keys = [(h, k) for h, k in COLUMNS if any(k in report[n] for n in names if n in report)]
  main_keys += [(k, k) for k in COUNT_KEYS if any(k in report[n] for n in names if n in report)]
  used = {k for _, k in main_keys} | {"model_dir"}
  # Gate weights are drawn as heatmaps, not listed.
  other_keys = sorted({k for n in report for k, v in report[n].items()
                       if k not in used and not k.startswith("gate/") and _is_number(v)})
  table_names = [n for n in names if n in report]

  parts = [
      "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
      f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
      f"<h1>{html.escape(title)}</h1>", f"<p>{_PROTOCOL}</p>", "<h2>Metrics</h2>",
  ]
  if table_names:
    parts.append(_html_table(report, main_keys, table_names))
    parts.append('<p class="note">Highlighted: the best model per column, the oracle left out '
                 "(AUC highest, log loss lowest, calibration nearest 1). Hover a header for its key.</p>")
    if other_keys:
      parts += ["<h3>Other metrics</h3>", _html_table(report, [(k, k) for k in other_keys], table_names)]
    dirs = [(n, report[n]["model_dir"]) for n in table_names if "model_dir" in report[n]]
    if dirs:
      parts.append("<p class=\"note\">Model directories: " + "; ".join(
          f"<b>{html.escape(n)}</b> <code>{html.escape(str(d))}</code>" for n, d in dirs) + "</p>")
  else:
    parts.append("<p>No metrics.</p>")
  for heading, figures in (("ROC curves", roc_figures), ("Reliability diagrams", reliability_figures),
                           ("MMoE gate utilisation", gate_figures)):
    if figures:
      parts += [f"<h2>{heading}</h2>", '<div class="grid">', *figures, "</div>"]
  if notes:
    parts += ["<h2>Notes</h2>", "<ul>", *(f"<li>{html.escape(n)}</li>" for n in notes), "</ul>"]
  parts += ["</body>", "</html>", ""]
  path = os.path.join(output_dir, "index.html")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))
  return path
