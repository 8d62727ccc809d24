"""``samed``: the command-line interface (segment, statistics, evaluate, train, annotate, info, import-samed).

Bad input ends with a one-line ``samed: error: ...`` message and exit status 2, never a traceback.
A cohort run (``segment`` with ``--output-dir``) exits 1 when some cases failed (listed in failures.csv).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

__all__ = ["main"]

EXIT_BAD_INPUT = 2
EXIT_SOME_CASES_FAILED = 1
EXIT_CANCELLED = 130
PRECISION_HELP = "auto: fp16 on CUDA, bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32; fp32: always fp32"


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _check_encoder_runtime(args, device: str) -> None:
    from .errors import SAMedError

    if args.openvino and getattr(args, "compile", False):
        raise SAMedError("give either --openvino or --compile, not both")
    if args.openvino and device != "cpu":
        raise SAMedError(f"--openvino runs the encoder on the CPU, but the device is '{device}' (add --device cpu)")


def _load_segmentation_model(args, device: str):
    """The checkpoint with its encoder compiled (--compile) or converted to OpenVINO (--openvino), once per process."""
    from .checkpoint import load_model

    loaded = load_model(args.model, device=device, base_checkpoint=args.base_checkpoint)
    if args.compile:
        from .acceleration import compile_encoder

        loaded.model.image_encoder = compile_encoder(loaded.model.image_encoder)
    if args.openvino:
        from .acceleration import use_openvino

        use_openvino(loaded.model, args.precision)
    return loaded


def cmd_segment(args) -> int:
    if _cohort_mode(args):
        return cmd_segment_cohort(args)
    from .console import segment_progress
    from .inference import resolve_device, segment_image
    from .segfile import write_seg_nrrd
    from .volume_io import WRITABLE_EXTENSIONS, VolumeError, read_volume, write_image

    # Check output names before minutes of work (and so a bad --seg-nrrd cannot leave a half-done result).
    if not Path(args.output).name.lower().endswith(WRITABLE_EXTENSIONS):
        raise VolumeError(f"{args.output}: unsupported output extension; use one of {', '.join(WRITABLE_EXTENSIONS)}")
    if args.seg_nrrd and not Path(args.seg_nrrd).name.lower().endswith(".seg.nrrd"):
        raise VolumeError(f"{args.seg_nrrd}: a segmentation file must end with .seg.nrrd")
    _check_preview_option(args)
    device = resolve_device(args.device)
    _check_encoder_runtime(args, device)
    image = read_volume(args.input)
    model = _load_segmentation_model(args, device)
    labels = segment_image(image, model, device=device, batch_size=args.batch_size,
                           largest_component=args.largest_component, precision=args.precision,
                           refinement=args.refine, cleanup=args.cleanup, fill_gaps=args.fill_gaps,
                           progress=None if args.quiet else segment_progress())
    write_image(labels, args.output)
    if args.seg_nrrd:
        write_seg_nrrd(labels, model.card.classes, args.seg_nrrd)
    if args.statistics:
        _write_single_statistics(args, image, labels, model)
    print(f"wrote {args.output}" + (f" and {args.seg_nrrd}" if args.seg_nrrd else ""), file=sys.stderr)
    if args.preview:
        prep = model.card.preprocessing
        _write_preview(args.preview, image, labels, model.card.classes,
                       window=prep.window if prep.modality == "CT" else None,
                       title=f"{Path(args.input).name} segmented with {Path(args.model).name}")
    return 0


def _cohort_mode(args) -> bool:
    """``--output-dir`` (any number of cases) or ``--output`` (exactly one volume, the original form)."""
    from .cohort import CohortError, is_single_volume

    if args.output_dir and args.output:
        raise CohortError("give either --output (one volume) or --output-dir (one or more cases), not both")
    if args.output_dir:
        if isinstance(args.seg_nrrd, str):
            raise CohortError("with --output-dir, --seg-nrrd takes no file name (it writes DIR/<case>.seg.nrrd)")
        return True
    if len(args.inputs) > 1 or not is_single_volume(args.inputs[0]):
        raise CohortError("--output-dir DIR is required for more than one case")
    if not args.output:
        raise CohortError("--output FILE (one volume) or --output-dir DIR is required")
    if args.seg_nrrd is True:
        raise CohortError("--seg-nrrd needs a file name with --output (or use --output-dir)")
    if args.overwrite or args.compile:
        raise CohortError("--overwrite and --compile are for --output-dir runs")
    if args.statistics:
        from .statistics import check_statistics_path

        check_statistics_path(args.statistics)  # before minutes of work
    args.input = args.inputs[0]
    return False


def _write_single_statistics(args, image, labels, model) -> None:
    from .cohort import case_id
    from .statistics import label_statistics, write_statistics

    write_statistics(label_statistics(image, labels, model.card.classes, case_id(args.input), Path(args.model).name),
                     args.statistics)


def cmd_segment_cohort(args) -> int:
    from .cohort import ModelSource, close_distributed, discover_cases, distributed_context, run_cohort
    from .inference import resolve_device, segment_image
    from .statistics import check_statistics_path, write_statistics

    if args.statistics:
        check_statistics_path(args.statistics)
    rank, world, device = distributed_context(resolve_device(args.device))
    _check_encoder_runtime(args, device)
    cases = discover_cases(args.inputs, args.output_dir, seg_nrrd=bool(args.seg_nrrd))
    model = ModelSource(args.model, lambda: _load_segmentation_model(args, device))

    def segment(image, loaded):
        return segment_image(image, loaded, device=device, batch_size=args.batch_size,
                             largest_component=args.largest_component, precision=args.precision,
                             refinement=args.refine, cleanup=args.cleanup, fill_gaps=args.fill_gaps)

    result = run_cohort(cases, model, segment, output_dir=args.output_dir, overwrite=args.overwrite,
                        statistics=bool(args.statistics), rank=rank, world=world, progress=not args.quiet)
    if rank == 0:
        if args.statistics:
            write_statistics(result.statistics, args.statistics)
        print(f"{len(result.done)} segmented, {len(result.skipped)} already done, {len(result.failures)} failed"
              + (f" (see {Path(args.output_dir) / 'failures.csv'})" if result.failures else ""), file=sys.stderr)
    close_distributed(world)
    return EXIT_SOME_CASES_FAILED if result.failures else 0


def cmd_statistics(args) -> int:
    from .classes import parse_class_list
    from .statistics import check_statistics_path, statistics_csv, statistics_for_files, write_statistics

    if args.output:
        check_statistics_path(args.output)
    rows = statistics_for_files(args.image, args.labels, parse_class_list(args.classes), model=args.model or "")
    if args.output:
        write_statistics(rows, args.output)
    else:
        print(statistics_csv(rows), end="")
    return 0


def _check_preview_option(args) -> None:
    """A --preview that could not be drawn fails before the work, not after it."""
    if args.preview:
        from .preview import check_preview_path, require_matplotlib

        check_preview_path(args.preview)
        require_matplotlib()


def _write_preview(path: str, image, labels, classes, window, title: str, reference=None) -> None:
    from .preview import write_preview

    write_preview(image, labels, classes, path, reference=reference, window=window, title=title)
    print(f"wrote preview {path}", file=sys.stderr)


def cmd_evaluate(args) -> int:
    from .classes import parse_class_list
    from .errors import SAMedError
    from .evaluation import evaluate_files
    from .metrics import format_table

    classes = parse_class_list(args.classes)
    if args.preview and not args.image:
        raise SAMedError("--preview needs --image, the scan to draw the outlines on")
    _check_preview_option(args)
    scores = evaluate_files(args.prediction, args.reference, classes)
    if args.json:
        print(json.dumps(_json_safe(scores), indent=1))
    else:
        print(format_table(scores, classes))
    if args.preview:
        from .volume_io import read_volume

        _write_preview(args.preview, read_volume(args.image), read_volume(args.prediction, allow_constant=True),
                       classes, window=tuple(args.window), reference=read_volume(args.reference, allow_constant=True),
                       title=f"{Path(args.prediction).name} (solid) against {Path(args.reference).name} (dashed): "
                             f"mean Dice {scores['mean_dice']:.3f}")
    return 0


def cmd_train(args) -> int:
    from .augmentation import AugmentationConfig
    from .classes import parse_class_list
    from .model_card import Preprocessing
    from .trainer import TrainConfig, train

    if len(args.image) != len(args.labels):
        raise SystemExit(_fail(f"need one --labels per --image (got {len(args.image)} and {len(args.labels)})"))
    prep = Preprocessing(modality=args.modality, window=tuple(args.window),
                         pixel_spacing_mm=args.pixel_spacing, inplane=args.inplane)
    augmentation = AugmentationConfig(p_rot90_flip=args.rot90_flip, p_tissue_shift=args.tissue_shift) \
        if not args.no_augmentation else AugmentationConfig(
        p_rot90_flip=0, p_small_rotation=0, scale_range=(1, 1), max_shift=0, p_far_shift=0, contrast_range=(1, 1), brightness=0,
        gamma_range=(1, 1), noise_std=0, p_class_level=0, p_blur=0)
    config = TrainConfig(
        images=args.image, labels=args.labels, classes=parse_class_list(args.classes), output=args.output,
        base=args.base, base_checkpoint=args.base_checkpoint, input_size=args.input_size, mode=args.mode,
        head=args.head, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, iterations=args.iterations,
        batch_size=args.batch_size, learning_rate=args.lr, warmup_fraction=args.warmup_fraction,
        head_start=args.head_start,
        views_per_slice=args.views_per_slice,
        max_labeled_slices=args.max_labeled_slices, validation_image=args.val_image,
        validation_labels=args.val_labels, validate_every=args.validate_every, early_stopping=args.early_stopping,
        refinement=args.refinement, cleanup=args.cleanup, device=args.device, precision=args.precision, seed=args.seed, cache_dir=args.cache_dir, resume=args.resume,
        init_from=args.init_from, openvino=args.openvino, stop_file=args.stop_file,
        preprocessing=prep,
        augmentation=augmentation)
    result = train(config, progress_json=args.progress_json)
    if not args.progress_json:
        print(f"wrote {result.path}", file=sys.stderr)  # the trainer's last line gave iterations, time and Dice
    return 0


def cmd_annotate(args) -> int:
    from .annotation import Annotator, box_from_cli, slice_from_cli
    from .inference import resolve_device
    from .volume_io import WRITABLE_EXTENSIONS, VolumeError, read_volume, to_canonical, write_image

    if not Path(args.output).name.lower().endswith(WRITABLE_EXTENSIONS):
        raise VolumeError(f"{args.output}: unsupported output extension; use one of {', '.join(WRITABLE_EXTENSIONS)}")
    if not 1 <= args.value <= 65535:
        raise ValueError(f"--value {args.value}: expected a label value from 1 to 65535")
    image = read_volume(args.input)
    restore = to_canonical(image)[1]
    boxes = [box_from_cli(restore, text) for text in args.box]  # every box checked before the model loads
    ends = [slice_from_cli(restore, text) for text in args.end or []]
    device = resolve_device(args.device)
    _check_encoder_runtime(args, device)
    annotator = Annotator.from_model(image, args.model, device=device, precision=args.precision,
                                     base_checkpoint=args.base_checkpoint, openvino=args.openvino)
    mask = annotator.annotate(boxes, propagate=not args.no_propagate, ends=ends,
                              progress=None if args.quiet else _progress_bar("annotate"))
    write_image(annotator.to_image(mask, args.value), args.output)
    print(f"wrote {args.output} ({int(mask.any(axis=(1, 2)).sum())} slices, {int(mask.sum())} voxels)", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .checkpoint import read_model_card

    print(read_model_card(args.model).to_json())
    return 0


def cmd_import_samed(args) -> int:
    from .checkpoint import SYNAPSE_CLASSES, import_samed_checkpoint, save_checkpoint
    from .classes import parse_class_list

    model, card = import_samed_checkpoint(args.samed_checkpoint, args.base_checkpoint,
                                          parse_class_list(args.classes or SYNAPSE_CLASSES), args.input_size)
    save_checkpoint(model, card, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .acceleration import PRECISIONS
    from .augmentation import AugmentationConfig
    from .model_card import CLEANUPS, CT_WINDOW, REFINEMENTS
    from .trainer import HEAD_STARTS, TrainConfig  # the defaults live in one place

    parser = argparse.ArgumentParser(prog="samed", description="SAMed/AutoSAM prompt-free segmentation of CT/MR volumes")
    parser.add_argument("-v", "--verbose", action="store_true", help="show warnings and debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a volume, or a cohort of them, with a fine-tuned model")
    seg.add_argument("inputs", nargs="+", metavar="input",
                     help="NIfTI/NRRD/MHA file or DICOM series folder; with --output-dir also several of them, "
                          "folders of cases (one per file or series subfolder) or a CSV with an 'image' column "
                          "(optional 'id', 'output')")
    seg.add_argument("--model", required=True, help="fine-tuned .safetensors checkpoint")
    seg.add_argument("--output", help="label map to write (.nii.gz, .nii, .nrrd, .mha) for one volume")
    seg.add_argument("--output-dir", help="folder for DIR/<case>.nii.gz (+ .seg.nrrd), failures.csv; cases whose "
                                          "outputs exist are skipped. Under torchrun the cases are shared out")
    seg.add_argument("--seg-nrrd", nargs="?", const=True,
                     help="also write a Slicer segmentation: FILE.seg.nrrd with --output, no value with --output-dir")
    seg.add_argument("--overwrite", action="store_true", help="with --output-dir: redo cases that are already done")
    seg.add_argument("--compile", action="store_true",
                     help="with --output-dir: torch.compile the encoder once (minutes) for faster slices in long runs; "
                          "runs uncompiled where compiling fails")
    seg.add_argument("--openvino", action="store_true",
                     help="run the encoder and head through OpenVINO on the CPU (pip install openvino): ~1.7x faster "
                          "slices on the benchmark CPU, ~10 s to convert once per process")
    seg.add_argument("--statistics", metavar="FILE", help="per case and class: voxels, volume (mL), mean/std "
                                                          "intensity, model (.csv or .json)")
    seg.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    seg.add_argument("--batch-size", type=int, default=None, help="slices per forward pass (default 16 CUDA / 4 MPS / 1 CPU)")
    seg.add_argument("--largest-component", action="store_true",
                     help="keep each class's largest 3D component (same as --cleanup largest)")
    seg.add_argument("--refine", choices=REFINEMENTS,
                     help="self-prompted refinement by the base model's decoder (default: the model card's)")
    seg.add_argument("--cleanup", choices=CLEANUPS, help="3D clean-up of each class (default: the model card's)")
    seg.add_argument("--fill-gaps", action=argparse.BooleanOptionalAction, default=None,
                     help="prompt the slices a refined organ was missed on between slices it was found on "
                          "(default: the model card's)")
    seg.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    seg.add_argument("--base-checkpoint", help="official SAM checkpoint, for models fine-tuned from sam_vit_*")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    seg.add_argument("--preview", metavar="PNG",
                     help="also draw a few slices with the segments' outlines (needs matplotlib)")
    seg.set_defaults(func=cmd_segment)

    st = sub.add_parser("statistics", help="per-class voxels, volume (mL), mean/std intensity of a label map")
    st.add_argument("--image", required=True, help="the image the intensities come from")
    st.add_argument("--labels", required=True, help="label map (resampled onto the image in physical space)")
    st.add_argument("--classes", required=True, help="VALUE:NAME,... e.g. 1:spleen,5:liver")
    st.add_argument("--model", help="name to put in the model column")
    st.add_argument("--output", help=".csv or .json file (default: CSV on stdout)")
    st.set_defaults(func=cmd_statistics)

    ev = sub.add_parser("evaluate", help="Dice and HD95 (mm) of a prediction against a reference label map")
    ev.add_argument("--prediction", required=True)
    ev.add_argument("--reference", required=True)
    ev.add_argument("--classes", required=True, help="VALUE:NAME,... e.g. 1:spleen,5:liver")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("--preview", metavar="PNG", help="draw a few slices of --image with the prediction's outlines "
                                                     "(solid) and the reference's (dashed); needs matplotlib")
    ev.add_argument("--image", help="the scan both label maps belong to (for --preview)")
    ev.add_argument("--window", type=float, nargs=2, default=list(CT_WINDOW), metavar=("LOW", "HIGH"),
                    help="--preview's display window (default: the CT window %g %g)" % CT_WINDOW)
    ev.set_defaults(func=cmd_evaluate)

    tr = sub.add_parser("train", help="fine-tune on labeled volumes")
    tr.add_argument("--image", action="append", required=True, help="training image (repeat for more pairs)")
    tr.add_argument("--labels", action="append", required=True, help="label map of the preceding --image")
    tr.add_argument("--classes", required=True, help="VALUE:NAME,... (other label values count as background)")
    tr.add_argument("--base", default="litemedsam", choices=["litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h"])
    tr.add_argument("--base-checkpoint", help="official SAM checkpoint file (required for sam_vit_*)")
    tr.add_argument("--input-size", type=int, help="encoder input size (sam_vit_*: default 1024; SAMed uses 512)")
    tr.add_argument("--mode", choices=["lora", "frozen"], help="default: lora on CUDA, frozen on CPU")
    tr.add_argument("--head", default="samed", choices=["samed", "autosam_vit", "cnn", "linear"])
    tr.add_argument("--lora-rank", type=int, default=TrainConfig.lora_rank)
    tr.add_argument("--lora-alpha", type=float, help="LoRA alpha (default = rank: scaling 1, as SAMed)")
    tr.add_argument("--iterations", type=int, default=TrainConfig.iterations)
    tr.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    tr.add_argument("--lr", type=float, default=TrainConfig.learning_rate,
                    help="peak learning rate (AdamW, warm-up + poly decay)")
    tr.add_argument("--warmup-fraction", type=float, default=TrainConfig.warmup_fraction,
                    help="share of the iterations the learning rate rises linearly to its peak (0 to <1)")
    tr.add_argument("--head-start", default=TrainConfig.head_start, choices=list(HEAD_STARTS),
                    help="probe (default): fit each class's output on the frozen features first (LP-FT; heads samed and "
                         "autosam_vit), steadier across seeds and precisions; symmetric: every class starts from the "
                         "pretrained mask token (the default before stop 23; README)")
    tr.add_argument("--views-per-slice", type=int, default=TrainConfig.views_per_slice,
                    help="frozen mode: plain + augmented views, each encoded once")
    tr.add_argument("--max-labeled-slices", type=int, help="use only this many labeled slices (label-efficiency)")
    tr.add_argument("--val-image", help="validation volume (default: hold out 10%% of labeled slices)")
    tr.add_argument("--val-labels", help="label map of --val-image")
    tr.add_argument("--validate-every", type=int, default=TrainConfig.validate_every)
    tr.add_argument("--early-stopping", type=int, help="stop after this many validations without improvement")
    tr.add_argument("--modality", default="CT", choices=["CT", "MR"])
    tr.add_argument("--window", type=float, nargs=2, default=[-125.0, 275.0], metavar=("LOW", "HIGH"))
    tr.add_argument("--inplane", default="spacing", choices=["spacing", "stretch"])
    tr.add_argument("--pixel-spacing", type=float, default=1.6, help="mm per model pixel (inplane=spacing)")
    tr.add_argument("--no-augmentation", action="store_true")
    tr.add_argument("--rot90-flip", type=float, default=AugmentationConfig.p_rot90_flip, metavar="P",
                    help="probability of SAMed's random 90-degree rotation + flip (SAMed: 0.5; default 0 keeps "
                         "the canonical orientation's left/right cue)")
    tr.add_argument("--tissue-shift", type=float, default=AugmentationConfig.p_tissue_shift, metavar="P",
                    help="probability that a view's unlabeled soft tissue is shifted by -40..+100 HU (the rest of "
                         "the body in another contrast phase)")
    tr.add_argument("--refinement", default=TrainConfig.refinement, choices=("auto", *REFINEMENTS),
                    help="self-prompted refinement recorded in the card (auto: chosen on the validation slices)")
    tr.add_argument("--cleanup", default=TrainConfig.cleanup, choices=CLEANUPS,
                    help="3D clean-up recorded in the card")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--precision", default=TrainConfig.precision, choices=PRECISIONS,
                    help=PRECISION_HELP + " (frozen-encoder embeddings)")
    tr.add_argument("--seed", type=int, default=1234)
    tr.add_argument("--cache-dir", help="keep frozen-encoder embeddings here for later runs")
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run with the same options")
    tr.add_argument("--openvino", action="store_true",
                    help="frozen mode on the CPU: encode the training views through OpenVINO (pip install openvino)")
    tr.add_argument("--init-from", metavar="MODEL", help="start from a trained model of the same base, head and "
                                                        "classes (e.g. --mode lora from a frozen-mode model's head)")
    tr.add_argument("--progress-json", action="store_true", help="one JSON object per line on stdout")
    tr.add_argument("--stop-file", help="stop cleanly (as on SIGTERM) once this file exists")
    tr.add_argument("--output", required=True, help="checkpoint to write (.safetensors)")
    tr.set_defaults(func=cmd_train)

    ann = sub.add_parser("annotate", help="box prompts -> a 3D mask (pretrained LiteMedSAM, propagated through slices)")
    ann.add_argument("input", help="NIfTI/NRRD/MHA file or DICOM series folder")
    ann.add_argument("--box", action="append", required=True, metavar="K,I0,J0,I1,J1",
                     help="box corners (i, j) in voxel indices on slice k of the image's third axis (repeat: "
                          "more boxes of the same object)")
    ann.add_argument("--end", action="append", metavar="K",
                     help="slice k of the third axis does not hold the object: propagation stops before it (repeat)")
    ann.add_argument("--output", required=True, help="label map to write (.nii.gz, .nii, .nrrd, .mha)")
    ann.add_argument("--value", type=int, default=1, help="label value inside the mask (default 1)")
    ann.add_argument("--no-propagate", action="store_true", help="only the boxes' own slices")
    ann.add_argument("--model", help="fine-tuned checkpoint whose encoder to use (default: pretrained LiteMedSAM)")
    ann.add_argument("--base-checkpoint", help="official SAM checkpoint, for models fine-tuned from sam_vit_*")
    ann.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    ann.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    ann.add_argument("--openvino", action="store_true",
                     help="run the encoder through OpenVINO on the CPU (pip install openvino): ~2.5x faster per "
                          "slice after a few seconds of conversion")
    ann.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ann.set_defaults(func=cmd_annotate)

    info = sub.add_parser("info", help="print a checkpoint's model card as JSON")
    info.add_argument("model")
    info.set_defaults(func=cmd_info)

    imp = sub.add_parser("import-samed", help="convert SAMed's published ViT-B LoRA checkpoint")
    imp.add_argument("samed_checkpoint")
    imp.add_argument("--base-checkpoint", required=True, help="official sam_vit_b_01ec64.pth")
    imp.add_argument("--classes", help="VALUE:NAME,... (default: SAMed's Synapse order)")
    imp.add_argument("--input-size", type=int, default=512)
    imp.add_argument("--output", required=True)
    imp.set_defaults(func=cmd_import_samed)
    return parser


def _fail(message: str) -> int:
    print(f"samed: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="samed: %(message)s")
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # timm's deprecation notices
    from .errors import SAMedError, one_line
    from .inference import Cancelled

    try:
        return args.func(args)
    except Cancelled:
        print("samed: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except (SAMedError, ValueError, FileNotFoundError) as exc:
        return _fail(one_line(exc))


if __name__ == "__main__":
    sys.exit(main())
