"""Command line of ``trainer.data``.

python -m trainer.data simulate --rows 1000000 --out data/sim --seed 0
python -m trainer.data simulate --rows 1000000 --out s3://bucket/sim   # AWS_* from the environment
python -m trainer.data simulate --days 7 --start 2026-12-01 --rows 200000 --out data/daily  # per day
python -m trainer.data stats data/sim                 # label rates per split
python -m trainer.data stats data/sim/train --scan    # also validate every row with the reader
python -m trainer.data stats s3://bucket/logs --filter "day >= '2026-11-25'"   # hive partitions
python -m trainer.data convert coat --out data/coat   # Coat (shipped) -> impression logs
python -m trainer.data convert ratings --train R3/train.txt --test R3/test.txt --out data/r3
python -m trainer.data convert aliccp --src ALICCP_DIR --out data/aliccp
python -m trainer.data convert aliexpress --src AliExpress_NL --out data/aliexpress_nl
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from schemas import storage
from schemas.features import FeatureSchema, SchemaError, load_schema
from schemas.storage import Kind, StorageError
from trainer.data._dataset import find_schema
from trainer.data._parquet import DataError
from trainer.data.converters import (
    COAT_DIR,
    AliCcpConfig,
    AliExpressConfig,
    ConversionError,
    ConversionResult,
    MnarConfig,
    TripleFormat,
    convert_aliccp,
    convert_aliexpress,
    convert_coat,
    convert_ratings,
)
from trainer.data.simulator import SPLITS, SimulatorConfig, simulate
from trainer.data.summary import LogSummary, format_summaries, summarize

__all__ = ["app"]

app = typer.Typer(
    help="Impression logs: simulate one with ground truth, convert a public data set or a "
    "rating log, or summarise one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
convert_app = typer.Typer(
    help="Convert Coat, an MNAR rating log, Ali-CCP or AliExpress into impression logs "
    "(schema.yaml, train/, test/, conversion.json). Malformed lines are counted and reported.",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")

_DEFAULTS = SimulatorConfig()
_OUT_HELP = "Data set directory to write: a path or a URI (s3://bucket/prefix)."


@app.command("simulate")
def simulate_command(
    out: Annotated[str, typer.Option(help=_OUT_HELP)],
    rows: Annotated[
        int, typer.Option(help="Impressions, train and test together (per day with --days).")
    ] = _DEFAULTS.rows,
    seed: Annotated[
        int, typer.Option(help="Seed; the same seed writes the same files.")
    ] = _DEFAULTS.seed,
    test_fraction: Annotated[
        float, typer.Option(help="Share of impressions in test/.")
    ] = _DEFAULTS.test_fraction,
    ctr: Annotated[float, typer.Option(help="Target mean click probability.")] = _DEFAULTS.ctr,
    cvr: Annotated[float, typer.Option(help="Target conversion rate on clicks.")] = _DEFAULTS.cvr,
    observed_confounding: Annotated[
        float,
        typer.Option(
            help="Weight of user intent + item appeal (logged features) in both logits: "
            "selection on observables; 0 removes it."
        ),
    ] = _DEFAULTS.observed_confounding,
    confounding: Annotated[
        float, typer.Option(help="Weight of the hidden confounder in both logits; 0 removes it.")
    ] = _DEFAULTS.confounding,
    dim: Annotated[int, typer.Option(help="Embedding dimension in the schema.")] = _DEFAULTS.dim,
    users: Annotated[int, typer.Option(help="Distinct users.")] = _DEFAULTS.num_users,
    items: Annotated[int, typer.Option(help="Distinct items.")] = _DEFAULTS.num_items,
    user_buckets: Annotated[
        int, typer.Option(help="Hash buckets of user_id.")
    ] = _DEFAULTS.user_buckets,
    item_buckets: Annotated[
        int, typer.Option(help="Hash buckets of item_id.")
    ] = _DEFAULTS.item_buckets,
    row_group_rows: Annotated[
        int, typer.Option(help="Rows per Parquet row group.")
    ] = _DEFAULTS.row_group_rows,
    file_rows: Annotated[
        int, typer.Option(help="Rows per part file at most.")
    ] = _DEFAULTS.file_rows,
    days: Annotated[
        int,
        typer.Option(
            help="Consecutive days to write, --rows each, as train/day=YYYY-MM-DD/ and "
            "test/day=YYYY-MM-DD/ partitions; 0 writes one data set without partitions."
        ),
    ] = _DEFAULTS.days,
    start: Annotated[str, typer.Option(help="The first day (YYYY-MM-DD).")] = _DEFAULTS.start,
    new_users: Annotated[
        float, typer.Option(help="Users new each later day, as a share of --users.")
    ] = _DEFAULTS.new_users,
    new_items: Annotated[
        float, typer.Option(help="Items new each later day, as a share of --items.")
    ] = _DEFAULTS.new_items,
    popularity_drift: Annotated[
        float,
        typer.Option(
            help="Std of the daily random-walk step of every user's and item's log-popularity."
        ),
    ] = _DEFAULTS.popularity_drift,
    overwrite: Annotated[bool, typer.Option(help="Replace part files already in OUT.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Write an Ali-CCP-shaped log with true CTR / CVR and known selection bias (or N days of it)."""
    try:
        cfg = SimulatorConfig(
            rows=rows,
            seed=seed,
            test_fraction=test_fraction,
            ctr=ctr,
            cvr=cvr,
            observed_confounding=observed_confounding,
            confounding=confounding,
            dim=dim,
            num_users=users,
            num_items=items,
            user_buckets=user_buckets,
            item_buckets=item_buckets,
            row_group_rows=row_group_rows,
            file_rows=file_rows,
            days=days,
            start=start,
            new_users=new_users,
            new_items=new_items,
            popularity_drift=popularity_drift,
        )
        result = simulate(cfg, out, overwrite=overwrite, progress=progress)
    except StorageError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    except (ValueError, FileExistsError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"wrote {out} in {result.seconds:.1f} s")
    typer.echo(
        f"intercepts: click a0 = {result.click_intercept:.4f}, "
        f"conversion b0 = {result.conversion_intercept:.4f}"
    )
    typer.echo(format_summaries({**result.splits, "all": result.overall}))
    if result.days:
        typer.echo(
            format_summaries(
                {
                    f"{split} {day}": s
                    for day, splits in result.days.items()
                    for split, s in splits.items()
                }
            )
        )


@app.command("stats")
def stats_command(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="A data set directory (with train/ and test/), a directory of part files or of "
            "hive partitions, or files; paths or URIs (s3://bucket/prefix)."
        ),
    ],
    schema: Annotated[
        str | None,
        typer.Option(help="Schema YAML; default: schema.yaml beside or above the data."),
    ] = None,
    filter: Annotated[
        str | None,
        typer.Option(
            "--filter", help="Keep the hive partitions it selects, e.g. \"day >= '2026-11-25'\"."
        ),
    ] = None,
    scan: Annotated[
        bool,
        typer.Option(
            help="Also read every row through the reader: validates every value, counts OOV "
            "values and truncated lists."
        ),
    ] = False,
) -> None:
    """Print label rates (and ground-truth bias, if present) of an impression log."""
    try:
        groups = _split_groups(paths)
        feature_schema = _find_schema(paths, schema)
        click, conversion = _label_names(feature_schema)
        summaries: dict[str, LogSummary] = {
            name: summarize(files, click=click, conversion=conversion, filter=filter)
            for name, files in groups.items()
        }
        if len(summaries) > 1:
            total = LogSummary()
            for s in summaries.values():
                total = total.merge(s)
            summaries["all"] = total
        typer.echo(format_summaries(summaries))
        if scan:
            if feature_schema is None:
                raise typer.BadParameter(
                    "--scan needs a schema: pass --schema or put schema.yaml beside the data"
                )
            for name, files in groups.items():
                typer.echo(f"\n{name}: " + _scan(files, feature_schema, filter))
    except (DataError, SchemaError, StorageError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None


_MNAR = MnarConfig()
_ALICCP = AliCcpConfig()
_ALIEXPRESS = AliExpressConfig()
Overwrite = Annotated[bool, typer.Option(help="Replace part files already in OUT.")]
Out = Annotated[str, typer.Option(help=_OUT_HELP)]
Strict = Annotated[
    bool, typer.Option(help="Stop at the first malformed line instead of counting and skipping it.")
]
Dim = Annotated[int, typer.Option(help="Embedding dimension of every feature in the schema.")]
Threshold = Annotated[float, typer.Option(help="conversion = rating >= threshold.")]
ValidationFraction = Annotated[
    float,
    typer.Option(
        help="Share of the user x item pairs moved from train/ into valid/ (for tuning; 0: none)."
    ),
]
ValidationFrom = Annotated[
    str,
    typer.Option(
        help="Where valid/ is drawn from: 'train' (the self-selected pairs) or 'test' (the "
        "random-exposure ratings, as the BADR paper splits Coat's; test/ keeps the rest)."
    ),
]
Seed = Annotated[int, typer.Option(help="Seed of the validation split.")]


@convert_app.command("coat")
def convert_coat_command(
    out: Out,
    src: Annotated[
        Path, typer.Option(help="Directory of the raw Coat files (default: the shipped copy).")
    ] = COAT_DIR,
    threshold: Threshold = 3.0,
    dim: Dim = _MNAR.dim,
    validation_fraction: ValidationFraction = 0.0,
    validation_from: ValidationFrom = _MNAR.validation_from,
    seed: Seed = 0,
    attributes: Annotated[
        bool, typer.Option(help="Add the user and item attributes (--no-attributes: ids only).")
    ] = True,
    overwrite: Overwrite = False,
) -> None:
    """Coat: every user x item pair, click = rated, conversion = rating >= 3; random-exposure test."""

    def run() -> ConversionResult:  # a bad option is reported like a bad file, not a traceback
        cfg = MnarConfig(
            threshold=threshold,
            dim=dim,
            validation_fraction=validation_fraction,
            validation_from=validation_from,
            seed=seed,
            name="coat",
        )
        return convert_coat(out, src, cfg, attributes=attributes, overwrite=overwrite)

    _report(out, run)


@convert_app.command("ratings")
def convert_ratings_command(
    train: Annotated[Path, typer.Option(help="Self-selected (user, item, rating) ratings.")],
    test: Annotated[Path, typer.Option(help="Random-exposure ratings, same format.")],
    out: Out,
    threshold: Threshold = _MNAR.threshold,
    delimiter: Annotated[
        str,
        typer.Option(
            help="Field separator of the rating files: whitespace, tab, comma, or a string."
        ),
    ] = "whitespace",
    header: Annotated[
        bool, typer.Option(help="The rating files start with a header line.")
    ] = False,
    user_col: Annotated[
        str, typer.Option(help="User column: 0-based position or header name.")
    ] = "0",
    item_col: Annotated[str, typer.Option(help="Item column: position or name.")] = "1",
    rating_col: Annotated[str, typer.Option(help="Rating column: position or name.")] = "2",
    user_attributes: Annotated[
        Path | None, typer.Option(help="Table of user attributes: header line, id column first.")
    ] = None,
    item_attributes: Annotated[Path | None, typer.Option(help="Table of item attributes.")] = None,
    attribute_id_col: Annotated[
        str | None, typer.Option(help="Id column name of the attribute tables (default: first).")
    ] = None,
    attribute_delimiter: Annotated[
        str, typer.Option(help="Field separator of the attribute tables (as --delimiter).")
    ] = "comma",
    name: Annotated[str, typer.Option(help="Schema name.")] = _MNAR.name,
    dim: Dim = _MNAR.dim,
    validation_fraction: ValidationFraction = 0.0,
    validation_from: ValidationFrom = _MNAR.validation_from,
    seed: Seed = 0,
    strict: Strict = False,
    overwrite: Overwrite = False,
) -> None:
    """Any MNAR rating log (Yahoo! R3, KuaiRec, yours): user x item impressions, random-exposure test."""

    def run() -> ConversionResult:
        fmt = TripleFormat(
            delimiter=_delimiter(delimiter),
            header=header,
            user=_column(user_col),
            item=_column(item_col),
            rating=_column(rating_col),
        )
        cfg = MnarConfig(
            threshold=threshold,
            dim=dim,
            validation_fraction=validation_fraction,
            validation_from=validation_from,
            seed=seed,
            name=name,
        )
        return convert_ratings(
            train,
            test,
            out,
            cfg,
            fmt=fmt,
            user_attributes=user_attributes,
            item_attributes=item_attributes,
            attribute_id_column=attribute_id_col,
            attribute_delimiter=_delimiter(attribute_delimiter),
            strict=strict,
            overwrite=overwrite,
        )

    _report(out, run)


@convert_app.command("aliccp")
def convert_aliccp_command(
    src: Annotated[
        Path,
        typer.Option(help="Directory of sample_skeleton_{train,test}.csv, common_features_*.csv."),
    ],
    out: Out,
    dim: Dim = _ALICCP.dim,
    fields: Annotated[
        str | None, typer.Option(help="Comma-separated field names to keep (default: all 23).")
    ] = None,
    buckets: Annotated[
        list[str] | None,
        typer.Option(help="FIELD=N: hash buckets of a field (repeatable), e.g. item_id=4194304."),
    ] = None,
    history_max_len: Annotated[
        int, typer.Option(help="Ids kept per behaviour history.")
    ] = _ALICCP.history_max_len,
    max_lines: Annotated[
        int | None, typer.Option(help="Convert only the first N skeleton lines of each split.")
    ] = None,
    strict: Strict = False,
    overwrite: Overwrite = False,
) -> None:
    """Ali-CCP: the skeleton joined with the common (user) features, streamed."""

    def run() -> ConversionResult:
        kept = tuple(f.strip() for f in fields.split(",")) if fields else _ALICCP.fields
        cfg = AliCcpConfig(
            fields=kept, dim=dim, history_max_len=history_max_len, buckets=_buckets(buckets or [])
        )
        return convert_aliccp(
            src, out, cfg, strict=strict, overwrite=overwrite, max_lines=max_lines
        )

    _report(out, run)


@convert_app.command("aliexpress")
def convert_aliexpress_command(
    src: Annotated[
        Path, typer.Option(help="A country directory with train.csv and test.csv (AliExpress_NL).")
    ],
    out: Out,
    dim: Dim = _ALIEXPRESS.dim,
    strict: Strict = False,
    overwrite: Overwrite = False,
) -> None:
    """AliExpress: categorical columns as sparse features, numerical ones standardised."""
    cfg = AliExpressConfig(dim=dim)
    _report(out, lambda: convert_aliexpress(src, out, cfg, strict=strict, overwrite=overwrite))


def _report(out: str, convert: Callable[[], ConversionResult]) -> None:
    """Run a conversion; print label rates and malformed lines, or the error (exit code 1)."""
    try:
        result = convert()
    except (ConversionError, FileExistsError, ValueError) as err:  # StorageError included
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"wrote {out} in {result.seconds:.1f} s")
    typer.echo(result.format())


def _delimiter(value: str) -> str | None:
    return {"whitespace": None, "tab": "\t", "comma": ","}.get(value, value)


def _column(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _buckets(items: list[str]) -> dict[str, int]:
    parsed = {}
    for item in items:
        name, sep, number = item.partition("=")
        if not (sep and name and number.isdigit()):
            raise ValueError(f"--buckets {item!r}: expected FIELD=N, e.g. item_id=4194304")
        parsed[name] = int(number)
    return parsed


def _split_groups(paths: list[str]) -> dict[str, list[str]]:
    """A data set directory is summarised per split; anything else as one log."""
    if len(paths) == 1:
        root = storage.resolve(paths[0])
        if all(storage.kind(root.join(split)) is Kind.DIRECTORY for split in SPLITS):
            return {split: [root.join(split).uri] for split in SPLITS}
    return {"log": list(paths)}


def _find_schema(paths: list[str], given: str | None) -> FeatureSchema | None:
    if given is not None:
        return load_schema(given)
    found = find_schema(paths[0])
    return None if found is None else load_schema(found)


def _label_names(schema: FeatureSchema | None) -> tuple[str, str]:
    if schema is None:
        return "click", "conversion"
    return schema.labels.click, schema.labels.conversion


def _scan(files: list[str], schema: FeatureSchema, filter: str | None) -> str:
    from trainer.data.reader import ImpressionReader  # torch is imported only when scanning

    reader = ImpressionReader(files, schema, batch_size=65_536, shuffle=False, filter=filter)
    for _ in reader:
        pass
    return reader.stats.format()


if __name__ == "__main__":
    app(prog_name="python -m trainer.data")
