"""Convert published copies of PubMedQA / MedMCQA / MedQA to canonical JSONL, and check contamination.

    python -m clinalign.data convert INPUT --out OUT.jsonl [--dataset auto|pubmedqa|medmcqa|medqa]
        [--report REPORT.json] [--format canonical|instruction|chat] [--keep-unlabeled]
        [--split NAME] [--config-name NAME]
    python -m clinalign.data check TRAIN EVAL

INPUT is a local file (.json, .jsonl, .csv, .parquet) or a hub id (`openlifescienceai/medmcqa`).
The last line printed is a one-line summary; bad input is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from clinalign.data import DATASETS, FORMATS, convert_file, count_overlap, load_records
from clinalign.errors import ClinalignError
from clinalign.json_io import write_json


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise ClinalignError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m clinalign.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    convert = commands.add_parser("convert", help="convert a file or hub id to JSONL")
    convert.add_argument("input", help="local file or hub id")
    convert.add_argument("--out", required=True, help="output JSONL path")
    convert.add_argument("--dataset", default="auto", choices=DATASETS, help="family (auto: detect from the records)")
    convert.add_argument("--report", help="write the conversion report (JSON) here")
    convert.add_argument("--format", default="canonical", choices=FORMATS, help="output format")
    convert.add_argument("--keep-unlabeled", action="store_true", help="keep records without an answer (answer null)")
    convert.add_argument("--split", help="hub split, or one split of a file's {split: [...]} wrapper")
    convert.add_argument("--config-name", help="hub config, e.g. pqa_labeled for qiaojin/PubMedQA")
    check = commands.add_parser("check", help="count eval questions that also appear in train")
    check.add_argument("train", help="training data (any input `convert` takes)")
    check.add_argument("eval", help="evaluation data (any input `convert` takes)")
    return parser


def summary(report: dict) -> str:
    """One line: kept of read, dataset, and the skip reasons with counts."""
    skipped = sum(report["skipped"].values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in report["skipped"].items())
    line = f"kept {report['kept']} of {report['read']} records ({report['dataset']}; {report['schema']})"
    return line + (f"; skipped {skipped}: {reasons}" if skipped else "; skipped 0")


def convert(args: argparse.Namespace) -> None:
    report = convert_file(
        args.input, args.out, args.dataset, args.format, args.keep_unlabeled, args.split, args.config_name
    )
    if args.report:
        write_json(args.report, report)
    print(f"{summary(report)} -> {args.out} ({report['kept']} lines, {args.format})")


def check(args: argparse.Namespace) -> None:
    train = load_records(args.train, keep_unlabeled=True).records
    evaluation = load_records(args.eval, keep_unlabeled=True).records
    overlap = count_overlap(train, evaluation)
    if overlap["ids"]:
        shown = ", ".join(overlap["ids"][:10]) + (", ..." if len(overlap["ids"]) > 10 else "")
        print(f"eval ids also in train: {shown}")
    share = overlap["same_question_and_options"] / max(overlap["eval"], 1)
    print(
        f"contamination: {overlap['same_question_and_options']} of {overlap['eval']} eval questions ({share:.1%}) "
        f"appear in train ({overlap['train']} questions) with the same options; "
        f"{overlap['same_question']} share the question text"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        (convert if args.command == "convert" else check)(args)
    except ClinalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
