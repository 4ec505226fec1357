"""``regate-inspect``: see which answer tokens the frozen teacher finds predictable.

Renders the reference losses of a few samples from a reference-loss store
(`regate_megatron.scoring.ref_store`) over their answer tokens:

* ``ref_loss.html``: each conversation as text, its assistant target tokens as
  spans coloured white (loss 0) to red (the largest loss shown); hovering a span
  shows its piece and loss. Low-loss tokens are the ones a text-only model already
  predicts, the tokens ReGATE tends to skip.
* ``ref_loss.png``: a heat map, one row per sample, one column per target token,
  labelled with the token pieces.

The store is opened against the dataset and tokenizer (`RefLossStore.open`), so a
store built for other data, another tokenizer or another sequence layout is an
error rather than a misaligned picture. A sample's target tokens are
``labels[loss_mask == 1]`` in order, one per value of ``store[sample_id]``.

Example::

    regate-inspect --data-path data/train.json --tokenizer-model spm.model \\
        --store refs/ --seq-length 128 --img-h 8 --img-w 8 --patch-dim 4 \\
        --sample-ids 0,5,9 --output inspect/
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from typing import Dict, List, Sequence

import numpy as np

from regate_megatron.data.layout import LAYOUT_FLAGS, add_layout_args, num_image_tokens
from regate_megatron.data.llava import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, ConversationDataset
from regate_megatron.data.tokenizer import SentencePieceTokenizer
from regate_megatron.scoring.ref_store import RefLossStore

__all__ = ["render", "main"]

_SPACE = "\u2581"  # SentencePiece's word-boundary marker


def _segments(sample, tokenizer) -> List[tuple]:
    """The conversation as ("text", str) / ("image", None) / ("target", token id) pieces."""
    tokens = sample.tokens.tolist()
    # Token j is a target iff it is the label of position j - 1 and that label is trained.
    is_target = [False] + (sample.loss_mask[:-1] == 1).tolist()
    segments: List[tuple] = []
    run: List[int] = []

    def flush():
        if run:
            text = tokenizer.decode(run)
            if text:
                segments.append(("text", text))
            run.clear()

    for j, token in enumerate(tokens):
        if is_target[j]:
            flush()
            segments.append(("target", token))
        elif token == IMAGE_TOKEN_INDEX:
            flush()
            if not segments or segments[-1][0] != "image":
                segments.append(("image", None))
        else:
            run.append(token)
    flush()
    return segments


def _sample_losses(dataset, store, sample_id: int):
    """(sample, target ids [n], losses float64 [n]) of one sample; ValueError if misaligned."""
    try:
        sample = dataset[dataset.index_of(sample_id)]
    except KeyError as exc:
        raise ValueError(f"--sample-ids: {exc.args[0]}") from None
    targets = sample.labels[sample.loss_mask == 1].tolist()  # [n], in position order
    losses = np.asarray(store[sample_id], dtype=np.float64)  # [n]
    if losses.shape[0] != len(targets):
        raise ValueError(
            f"sample {sample_id} has {len(targets)} target tokens but {losses.shape[0]} reference "
            f"losses in {store.path}; the store was not built for this dataset (open it with "
            f"RefLossStore.open(path, dataset=..., tokenizer=...) to find out why)"
        )
    return sample, targets, losses


def _colour(loss: float, vmax: float) -> str:
    """White (0) to red (vmax)."""
    fade = round(255 * (1.0 - min(max(loss / vmax, 0.0), 1.0)))
    return f"rgb(255,{fade},{fade})"


def _write_html(path: str, rows: list, tokenizer, vmax: float, store) -> None:
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>ReGATE reference losses</title>',
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".conv{white-space:pre-wrap;font-family:monospace;border:1px solid #ccc;padding:.5em;"
        "margin:.3em 0 1.5em}.tok{border-radius:2px}.img{color:#06c}"
        ".bar{display:inline-block;width:16em;height:1em;vertical-align:middle;"
        "background:linear-gradient(to right,rgb(255,255,255),rgb(255,0,0));border:1px solid #999}"
        "</style></head><body>",
        "<h1>Reference losses of the text-only teacher</h1>",
        f"<p>Store <code>{html.escape(store.path)}</code>, teacher "
        f"<code>{html.escape(str(store.meta.get('teacher')))}</code>, visual positions "
        f"<code>{html.escape(str(store.meta.get('teacher_visual')))}</code>.</p>",
        f'<p>Legend: reference loss (nats) 0 <span class="bar"></span> {vmax:.3f}. '
        "Assistant target tokens are coloured by the teacher's loss; hover for the piece and "
        "value. Pale tokens are predictable from the text alone (candidates to skip); red ones "
        "need the image.</p>",
    ]
    for sample_id, sample, targets, losses in rows:
        mean = float(losses.mean()) if losses.size else 0.0
        out.append(f"<h3>sample {sample_id}: {len(targets)} target tokens, mean reference loss "
                   f"{mean:.3f}</h3>")
        spans, k = [], 0
        for kind, value in _segments(sample, tokenizer):
            if kind == "text":
                spans.append(html.escape(value))
            elif kind == "image":
                spans.append(f'<span class="img">{html.escape(IMAGE_PLACEHOLDER)}</span>')
            else:
                piece = tokenizer.id_to_piece(value)
                loss = float(losses[k])
                k += 1
                spans.append(
                    f'<span class="tok" style="background:{_colour(loss, vmax)}" '
                    f'title="{html.escape(piece, quote=True)} {loss:.3f}">'
                    f"{html.escape(piece.replace(_SPACE, ' '))}</span>"
                )
        out.append(f'<div class="conv">{"".join(spans)}</div>')
    out.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def _write_png(path: str, rows: list, tokenizer, vmax: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    longest = max(len(targets) for _, _, targets, _ in rows)
    fig = Figure(figsize=(max(6.0, 0.22 * longest + 2.5), 1.1 * len(rows) + 1.0),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    image = None
    for ax, (sample_id, _, targets, losses) in zip(axes, rows):
        # [n] -> [1, n]: one heat-map row per sample, padded to the longest with blanks.
        row = np.full((1, longest), np.nan)
        row[0, : losses.size] = losses
        image = ax.imshow(row, cmap="Reds", vmin=0.0, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(targets)))
        ax.set_xticklabels([tokenizer.id_to_piece(t) for t in targets], rotation=90, fontsize=7)
        ax.set_yticks([0])
        ax.set_yticklabels([f"sample {sample_id}"])
    fig.colorbar(image, ax=list(axes), label="reference loss (nats)")
    fig.suptitle("Teacher reference loss per assistant target token")
    fig.savefig(path, dpi=110)


def render(dataset, tokenizer, store, sample_ids: Sequence[int], out_dir: str) -> Dict[str, str]:
    """Write ``ref_loss.html`` and ``ref_loss.png`` for ``sample_ids`` into ``out_dir``.

    ``store`` should be opened with ``RefLossStore.open(path, dataset=dataset,
    tokenizer=tokenizer)``; a sample whose loss count differs from its target count is
    a ValueError either way. Returns ``{"html": path, "png": path}``.
    """
    sample_ids = [int(s) for s in sample_ids]
    if not sample_ids:
        raise ValueError("no samples to render; pass at least one sample id")
    rows = [(sid, *_sample_losses(dataset, store, sid)) for sid in sample_ids]
    vmax = max((float(losses.max()) for *_, losses in rows if losses.size), default=0.0)
    vmax = vmax if vmax > 0 else 1.0  # one colour scale for every sample
    os.makedirs(out_dir, exist_ok=True)
    paths = {"html": os.path.join(out_dir, "ref_loss.html"),
             "png": os.path.join(out_dir, "ref_loss.png")}
    _write_html(paths["html"], rows, tokenizer, vmax, store)
    _write_png(paths["png"], rows, tokenizer, vmax)
    return paths


def _sample_id_list(text: str) -> List[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 0,5,9, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one sample id")
    return ids


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="regate-inspect",
        description="Render a reference-loss store's per-token losses as HTML and a heat map.",
    )
    p.add_argument("--data-path", required=True, help="LLaVA-format JSON/JSONL records")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    p.add_argument("--store", required=True, help="reference-loss store directory")
    add_layout_args(p, required=LAYOUT_FLAGS)
    p.add_argument("--image-root", default=None, help="default: the data file's directory")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="skip invalid records, as the store's build did")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--samples", type=int, default=4,
                       help="render the first N samples (default 4)")
    which.add_argument("--sample-ids", type=_sample_id_list, default=None,
                       help="comma-separated sample ids (record indices), e.g. 0,5,9")
    p.add_argument("--output", required=True, help="directory for ref_loss.html / ref_loss.png")
    return p


def _run(args) -> Dict[str, str]:
    try:
        image_tokens = num_image_tokens(args.img_h, args.img_w, args.patch_dim)
    except ValueError as err:
        raise ValueError(f"{err}; use the values the store was built with") from None
    if args.sample_ids is None and args.samples <= 0:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    dataset = ConversationDataset(
        args.data_path, tokenizer,
        seq_length=args.seq_length,
        num_image_tokens=image_tokens,
        image_size=(args.img_h, args.img_w),
        image_root=args.image_root,
        skip_bad_samples=args.skip_bad_samples,
    )
    store = RefLossStore.open(args.store, dataset=dataset, tokenizer=tokenizer)
    sample_ids = (args.sample_ids if args.sample_ids is not None
                  else dataset.sample_ids[: args.samples])
    return render(dataset, tokenizer, store, sample_ids, args.output)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        paths = _run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"regate-inspect: error: {exc}", file=sys.stderr)
        return 2
    print(paths["html"])
    print(paths["png"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
