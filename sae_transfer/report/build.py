"""Build the report from the catalog: one query per section, figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sae_transfer.report import plots
from sae_transfer.report.findings import findings
from sae_transfer.report.published import beside_ours, published_note, published_pair, published_rows
from sae_transfer.storage import catalog
from sae_transfer.storage.layout import StudyLayout
from sae_transfer.storage.store import RemotePath, location, write_bytes_atomic

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;\
max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.78rem;margin:.6rem 0 1rem;max-width:100%}
th,td{border:1px solid #ccc;padding:.2rem .35rem;text-align:right;overflow-wrap:anywhere}th{background:#f3f3f3}
ul.findings li{margin:.35rem 0;line-height:1.4}
td:first-child,th:first-child{text-align:left}.note{color:#555;font-size:.9rem}
img{max-width:100%;border:1px solid #eee}.empty{color:#a00}
tr.unreliable td{color:#999;background:#fafafa}td.why{text-align:left;font-size:.8rem}
.card{border:1px solid #ddd;border-radius:4px;padding:.5rem .7rem;margin:.6rem 0;font-size:.85rem}
.ctx{font-family:ui-monospace,monospace;font-size:.78rem;margin:.25rem 0;white-space:pre-wrap;overflow-wrap:anywhere}
.ctx .act{color:#555;margin-right:.4rem}
"""


@dataclass
class Section:
    """One report section: a title, a note, tables and figures."""

    slug: str
    title: str
    note: str
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)  # sentences shown before the tables
    html_blocks: list[str] = field(default_factory=list)  # ready HTML (latent cards), after the figures


@dataclass(frozen=True)
class ReportPaths:
    html: Path | RemotePath
    markdown: Path | RemotePath
    figures: list[Path | RemotePath]


def _q(con, name: str, params: list) -> pd.DataFrame:
    """Run query `name`, binding as many of `params` as it numbers (?1, ?2, ...)."""
    sql = catalog.load_query(name)
    n = max((int(i) for i in re.findall(r"\?(\d+)", sql)), default=0)
    return con.execute(sql, params[:n]).df()


def split_sweep(transfer: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The transfer table without its `variant` column when no SAE belongs to a sweep, and the
    variant the findings describe (the first label in order), or None."""
    if "variant" not in transfer.columns:
        return transfer, None
    labels = sorted(transfer["variant"].dropna().unique())
    if not labels:
        return transfer.drop(columns=["variant"]), None
    return transfer, labels[0]


def collect_sections(results_dir: str | Path, base: str, chat: str, *, scatter_rows: int = 4000) -> list[Section]:
    """Run every report query on the catalog and draw the figures."""
    con = catalog.connect(results_dir)
    try:
        pair = [base, chat]
        transfer, first_variant = split_sweep(_q(con, "transfer_table", pair))
        named = {name: _q(con, name, pair) for name in ("outlier_table", "segments_table", "finetune_table", "drift",
                                                        "diff_class_counts", "latent_status_counts", "latent_ablation_table",
                                                        "crosscoder_agreement", "activation_diff_tokens")}
        primary = (transfer if first_variant is None
                   else transfer[transfer["variant"].isin([first_variant])].drop(columns=["variant"]))
        sentences = findings(primary, named["outlier_table"], named["segments_table"], named["finetune_table"], named["drift"],
                             tuple(named[n] for n in ("diff_class_counts", "latent_status_counts", "latent_ablation_table",
                                                      "crosscoder_agreement", "activation_diff_tokens")))
        sections = [
            Section("findings", "Findings", "One sentence per research question, from the tables below "
                    "(CE loss recovered with its bootstrap 95 % interval over sequences).",
                    bullets=(sentences or ["no results yet"]) + (
                        [f"SAEs of a sweep: these sentences compare variant {first_variant}; the transfer matrix "
                         "lists every variant."] if first_variant is not None else [])),
            Section("transfer", "Transfer matrix (plain text)",
                    "Every SAE spliced into every model on held-out text. CE loss recovered uses the zero-ablation baseline, "
                    "with a bootstrap 95% interval over sequences. `excluded`: outlier-norm positions are not counted and keep "
                    "their own activation; `included`: every position is spliced. r = s_eval / s_train: the SAE reconstructs "
                    "SAE(r x) / r on the evaluated model. Greyed rows have ill-conditioned denominators and are not findings.",
                    [(f"outliers {policy}", part.drop(columns=["outlier_policy"]))
                     for policy, part in transfer.groupby("outlier_policy", sort=False)],
                    [("transfer matrix, outliers excluded", plots.transfer_heatmap(primary))] if not primary.empty else []),
        ]
        if (note := published_note(base, chat)) is not None:  # a pair the study used: its numbers beside ours
            sections.append(Section("published", "The study's published numbers", note, [("published vs ours", beside_ours(
                published_rows(base, chat), primary, published_pair(base, chat)["hook"]))]))
        scatter = _q(con, "mse_vs_norm", pair + [scatter_rows])
        sections.append(Section("outliers", "Outlier-norm activations",
                                "Tokens whose scaled norm (mean norm rescaled to sqrt(d_model)) passes the threshold, "
                                "and what they are.",
                                [("outlier summary", named["outlier_table"])],
                                [("MSE vs scaled norm (log y)", plots.mse_vs_norm(scatter))] if not scatter.empty else []))
        sections.append(Section("segments", "Instruction-formatted data",
                                "Greedy chat rollouts on held-out prompts; each SAE is spliced only at one segment's positions.",
                                [("segments", named["segments_table"])]))
        sections.append(Section("finetune", "Fine-tuned base SAE",
                                "On the chat model, outliers included (as the study's fine-tuning table).",
                                [("fine-tuned SAE vs from-scratch SAEs", named["finetune_table"])]))
        diff = _q(con, "weight_diff", [])
        sections.append(Section("weights", "Chat vs base weights",
                                "Relative Frobenius norm of the weight change per layer and matrix.",
                                [("largest changes", diff.sort_values("rel_diff", ascending=False).head(12))],
                                [("weight differences", plots.weight_diff(diff))] if not diff.empty else []))
        positions = _q(con, "positions", pair)
        sections.append(Section("positions", "Position curves (length generalisation)",
                                "Reconstruction by position bucket, up to 4x the SAE's training context.",
                                [], [("by position", plots.position_curves(positions))] if not positions.empty else []))
        curves = _q(con, "training_curves", [])
        sections.append(Section("training", "Training curves", "Logged every few steps of every SAE run.",
                                [], [("training", plots.training_curves(curves))] if not curves.empty else []))
        drift = named["drift"]
        sections.append(Section("drift", "Drift across fine-tuning checkpoints",
                                "Each SAE on each chat fine-tuning checkpoint as the watcher evaluated it (step 0 = base model).",
                                [("drift", drift)],
                                [("drift", plots.drift(drift[drift["outlier_policy"] == "excluded"]))]
                                if not drift.empty else []))
        sections.append(_activation_diff_section(con, pair, named["activation_diff_tokens"]))
        sections.append(_diffing_section(con, pair))
        return sections
    finally:
        con.close()


def _activation_diff_section(con, pair: list[str], tokens: pd.DataFrame) -> Section:
    """What moved before any dictionary: chat - base per token, role, position, and its principal directions."""
    return Section(
        "activation-diff", "What moved: the activation difference",
        "Both models on the same tokens, chat minus base in raw model units (the diffing-toolkit family's baseline; "
        "no training, so a token whose activation moves cannot hide). consistency = ||mean diff|| / mean ||diff|| "
        "(1: every occurrence moves the same way); rel_to_typical: against the median token. Principal directions of "
        "the centred difference, with the SAE latents whose decoders align best; a shift at every position shows as the "
        "'all' row's norm_of_mean, not as a direction.",
        [("tokens with the largest mean ||chat - base||", tokens),
         ("overall, per role, per position bucket, principal directions", _q(con, "activation_diff_groups", pair))])


def _diffing_section(con, pair: list[str], n_cards: int = 6) -> Section:
    """What changed inside: latent classes, density shift, decoder cosines, Latent Scaling, cards."""
    classes, status = _q(con, "diff_class_counts", pair), _q(con, "latent_status_counts", pair)
    density, cosines = _q(con, "density_shift", pair), _q(con, "decoder_cosines", pair)
    scaling, ablation = _q(con, "latent_scaling_ratios", pair), _q(con, "latent_ablation_table", pair)
    drift = _q(con, "latent_drift_summary", pair)
    agreement, changed = _q(con, "crosscoder_agreement", pair), _q(con, "top_changed_latents", pair + [n_cards])
    cards = _q(con, "top_chat_latents", pair + [n_cards])
    figures = [(title, draw(df)) for title, draw, df in (
        ("firing density of every SAE latent on base vs chat", plots.density_shift, density),
        ("decoder cosines", plots.decoder_cosines, cosines),
        ("Latent Scaling of chat-only crosscoder latents", plots.scaling_ratios, scaling)) if not df.empty]
    return Section(
        "diffing", "What changed inside",
        "Per-latent diffing (Minder et al. 2025, arXiv 2504.02922): a BatchTopK crosscoder over paired base/chat "
        "activations classes each latent by its relative decoder norm rho and its decoder cosine (shared: balanced "
        "norms, agreeing directions; changed: both decoders alive, pointing apart); Latent Scaling separates truly chat-only "
        "latents from Complete Shrinkage and Latent Decoupling; each study SAE's latents are followed from base to chat "
        "(dies / appears); ablating the chat-appearing latents measures what they do.",
        [("crosscoder latents by class", classes),
         ("crosscoder decoder agreement on balanced-norm latents (disagree = true: under-trained, classes unreliable)",
          agreement),
         ("changed crosscoder latents (chat-minus-base direction in crosscoder_latents.chat_minus_base)", changed),
         ("SAE latents from base to chat", status),
         ("causal check: KL(clean || ablated) on chat transcripts", ablation),
         ("latent drift of fine-tuned base SAEs (study fine-tune; brief fine-tunes per checkpoint)", drift)],
        figures, html_blocks=[latent_cards(cards)])


def latent_cards(cards: pd.DataFrame) -> str:
    """One card per top crosscoder latent (chat-only ones first, then changed ones): its class, rho,
    decoder norms, and max-activating contexts with every token shaded by its activation there."""
    if cards.empty:
        return '<p class="empty">no crosscoder latents yet</p>'
    out = []
    for latent, rows in cards.groupby("latent", sort=False):
        head = rows.iloc[0]
        lines = []
        for _, r in rows.iterrows():
            tokens, acts = list(r["tokens"] if r["tokens"] is not None else []), list(r["acts"])
            top = max(acts) if acts else 1.0
            spans = "".join(
                f'<span style="background:rgba(214,39,40,{min(a / top, 1.0) if top > 0 else 0:.2f})" title="{a:.3g}">'
                f"{html.escape(t).replace(chr(10), '&#8629;')}</span>" for t, a in zip(tokens, acts))
            lines.append(f"<div class='ctx'><span class='act'>{r['activation']:.3g}</span> {spans}</div>")
        out.append(f"<div class='card'><b>latent {latent}</b> ({head['latent_class'].replace('_', '-')}) "
                   f"rho {head['rho']:.3f} (||d chat|| {head['norm_chat']:.2f}, "
                   f"||d base|| {head['norm_base']:.2f}), decoder cosine {head['dec_cos']:.2f}, fires on "
                   f"{head['frequency']:.3%} of paired tokens; the same tokens feed both models, so its write is "
                   f"{head['norm_chat']:.2f} x activation into chat and {head['norm_base']:.2f} x into base"
                   f"{''.join(lines)}</div>")
    return "".join(out)


def _cell(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _unreliable(flag) -> bool:
    """True for an explicit `reliable = false` (null: rows written before the flag existed)."""
    return flag is not None and not pd.isna(flag) and not bool(flag)


def _html_table(df: pd.DataFrame) -> str:
    """An HTML table; rows whose `reliable` is false are greyed, with the reason as their note."""
    if df.empty:
        return '<p class="empty">no rows yet</p>'
    flagged = "reliable" in df.columns
    shown = df.drop(columns=[c for c in ("reliable", "unreliable_reason") if c in df.columns])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns) + ("<th>note</th>" if flagged else "")
    rows = []
    for i, row in enumerate(shown.itertuples(index=False)):
        bad = flagged and _unreliable(df["reliable"].iloc[i])
        note = (f"<td class='why'>not a finding: {html.escape(str(df['unreliable_reason'].iloc[i]))}</td>" if bad
                else ("<td></td>" if flagged else ""))
        cells = "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
        rows.append(f"<tr{' class=unreliable' if bad else ''}>{cells}{note}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _md_table(df: pd.DataFrame) -> str:
    """A Markdown table; unreliable rows carry "(not a finding: reason)" in a note column."""
    if df.empty:
        return "_no rows yet_\n"
    flagged = "reliable" in df.columns
    shown = df.drop(columns=[c for c in ("reliable", "unreliable_reason") if c in df.columns])
    cols = list(shown.columns) + (["note"] if flagged else [])
    lines = []
    for i, row in enumerate(shown.itertuples(index=False)):
        cells = [_cell(v) for v in row]
        if flagged:
            bad = _unreliable(df["reliable"].iloc[i])
            cells.append(f"not a finding: {df['unreliable_reason'].iloc[i]}" if bad else "")
        lines.append("| " + " | ".join(cells) + " |\n")
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "".join(lines)


def render(sections: list[Section], title: str, out_dir: str | Path) -> ReportPaths:
    """Write report.html (self-contained), report.md and the figures as PNG files, each whole
    (a local folder or an object-store prefix)."""
    out = location(out_dir)
    parts, md, figures = [f"<h1>{html.escape(title)}</h1>"], [f"# {title}\n"], []
    for sec in sections:
        parts.append(f'<h2 id="{sec.slug}">{html.escape(sec.title)}</h2><p class="note">{html.escape(sec.note)}</p>')
        md.append(f"\n## {sec.title}\n\n{sec.note}\n")
        if sec.bullets:
            parts.append("<ul class='findings'>" + "".join(f"<li>{html.escape(b)}</li>" for b in sec.bullets) + "</ul>")
            md.append("\n" + "".join(f"- {b}\n" for b in sec.bullets))
        for caption, df in sec.tables:
            parts.append(f"<h3>{html.escape(caption)}</h3>{_html_table(df)}")
            md.append(f"\n**{caption}**\n\n{_md_table(df)}")
        for i, (caption, png) in enumerate(sec.figures):
            path = out / "figures" / f"{sec.slug}-{i}.png"
            write_bytes_atomic(path, png)
            figures.append(path)
            data = base64.b64encode(png).decode()
            parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                         f'<figcaption>{html.escape(caption)}</figcaption></figure>')
            md.append(f"\n![{caption}](figures/{path.name})\n")
        for block in sec.html_blocks:
            parts.append(block)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    html_path, md_path = out / "report.html", out / "report.md"
    for path, text in ((html_path, page), (md_path, "".join(md))):
        write_bytes_atomic(path, text.encode())
    return ReportPaths(html_path, md_path, figures)


def build_report(results_dir: str | Path, base: str, chat: str, title: str | None = None) -> ReportPaths:
    """Query the catalog of `results_dir` and write the report under `<results_dir>/report/`."""
    layout = StudyLayout(location(results_dir))
    sections = collect_sections(results_dir, base, chat)
    return render(sections, title or f"SAE transfer: {base} vs {chat}", layout.report)
