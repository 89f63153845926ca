"""The languages a checkpoint holds: show them with their fingerprints, compare two checkpoints, remove one.

Usage:
    python jobs/languages.py show CKPT
    python jobs/languages.py compare OLD NEW
    python jobs/languages.py remove CKPT --lang ja --out OUT [--force]

    show      the model's languages and the fingerprint of what each reads alone (its adapters) and of what all
              share (towers, token table, projection, shared adapter parts)
    compare   which parts differ between two checkpoints: after `train_stage.py --add-language ja`, only ja is new
              and nothing else changed (exit 0); a changed shared part or language exits 1
    remove    a checkpoint without the language: its adapters dropped, every other weight bit-identical (the
              inverse of --add-language), written atomically to OUT

Adding a language is `jobs/train_stage.py --stage nlt --add-language ja --from CKPT` (then `--stage le
--add-language ja`); README "Adding a language". No Ray: this runs anywhere the checkpoints are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccr_ray.cli import fail


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show")
    show.add_argument("checkpoint")
    compare = commands.add_parser("compare")
    compare.add_argument("old")
    compare.add_argument("new")
    remove = commands.add_parser("remove")
    remove.add_argument("checkpoint")
    remove.add_argument("--lang", required=True)
    remove.add_argument("--out", required=True)
    remove.add_argument("--force", action="store_true")
    return parser.parse_args(argv)


def compare(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """part -> "unchanged" / "changed" / "added" / "removed"."""
    parts = sorted(set(old) | set(new), key=lambda p: (p != "shared", p))
    return {p: "added" if p not in old else "removed" if p not in new else
            "unchanged" if old[p] == new[p] else "changed" for p in parts}


def remove_language(checkpoint: str, lang: str, out: str, force: bool = False) -> Path:
    """A copy of the checkpoint without `lang`: the model rebuilt for the other languages and loaded with their
    weights (strict), tokenizer and config carried over; the training-only files (optimizer, discriminator) dropped."""
    import dataclasses

    from ccr_ray import checkpoint as ckpt
    from ccr_ray.models.ccr import build_model
    from ccr_ray.tokenization import TokenizerInfo

    model, meta = ckpt.load_checkpoint(checkpoint)
    if lang not in model.languages:
        raise ValueError(f"--lang: {checkpoint} has no {lang!r} (its languages: {', '.join(model.languages)})")
    if len(model.languages) == 1:
        raise ValueError(f"--lang: {lang} is the model's only language")
    cfg = meta.experiment
    keep = [other for other in cfg.model.languages if other != lang]
    text = dataclasses.replace(cfg.model.text, language_offsets=[a for a in cfg.model.text.language_offsets if a != lang])
    model_cfg = dataclasses.replace(cfg.model, languages=keep, text=text,
                                    add_languages=[a for a in cfg.model.add_languages if a != lang])
    smaller = build_model(model_cfg, TokenizerInfo(**meta.tokens), clip_cfg=meta.clip_cfg)
    dropped = model.language_parameters()[lang]
    smaller.load_state_dict({k: v for k, v in model.state_dict().items() if k not in dropped}, strict=True)
    target = Path(out)
    if target.exists() and not force:
        raise FileExistsError(f"--out: {target} exists (add --force to replace it)")
    config = dataclasses.replace(cfg, model=model_cfg).to_dict()
    ckpt.save_checkpoint(target, smaller, dataclasses.replace(meta, config=config),
                         tokenizer_dir=ckpt.tokenizer_of(checkpoint))
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ccr_ray import checkpoint as ckpt

    try:
        if args.command == "show":
            meta = ckpt.read_meta(args.checkpoint)
            prints = ckpt.read_fingerprints(args.checkpoint)
            print(f"{args.checkpoint}: stage {meta.stage}, languages en (the tower's own), "
                  f"{', '.join(meta.experiment.model.languages)}")
            for part, value in prints.items():
                print(f"  {part:8s} {value[:16]}")
            return 0
        if args.command == "compare":
            result = compare(ckpt.read_fingerprints(args.old), ckpt.read_fingerprints(args.new))
            for part, what in result.items():
                print(f"  {part:8s} {what}")
            changed = [p for p, what in result.items() if what in ("changed", "removed")]
            if changed:
                print(f"changed: {', '.join(changed)}")
            return 1 if changed else 0
        out = remove_language(args.checkpoint, args.lang, args.out, args.force)
        print(f"wrote {out}: languages {', '.join(ckpt.read_meta(out).experiment.model.languages)}")
        return 0
    except (ckpt.CheckpointError, ValueError, FileExistsError) as err:
        return fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
