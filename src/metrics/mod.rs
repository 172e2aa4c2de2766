//! The paper's evaluation suite: gIoU/cIoU under the MUSE and LISA protocols, CHAIR,
//! boundary IoU, localization error and no-target accuracy, computed deterministically
//! from a MUSE-schema `DATA.json` and a `PRED.jsonl` of any model's predictions.
//!
//! The command is `popen eval` ([`eval::evaluate_files`]); the pieces are usable alone:
//! [`assign`] (the deterministic maximum-IoU assignment), [`chair`] (CHAIR counts over
//! the vocabulary and matcher of [`crate::data::vocab`]), [`eval`] (loading, validation, per-question scores, the report).
//! [`pearson`] is Supp C's correlation coefficient.  [`masks`] is the engine of
//! `popen eval-masks` (PNG masks in two folders).
//! [`separability`] asks whether embeddings carry their targets' categories
//! (`popen probe-embeddings`).
//! [`raster`] decodes masks to foreground intervals and computes counts and boundaries
//! on them; both are tested equal to the mask-metric kernels' CPU twins
//! ([`crate::kernels::mask`]) on dense masks.
//!
//! # Definitions, exactly as implemented
//!
//! Inputs. `DATA.json` is a list of MUSE image records (`file_name`, `height`, `width`,
//! `questions`, `answers` = per question a list of annotations with `category_name` and
//! `segmentation` as COCO RLE or polygons, optional `ann_list`). Polygons are
//! rasterized by the COCO rule, bit for bit as `pycocotools.frPyObjects`
//! ([`crate::data::polygon`]), the rings of one annotation united. `PRED.jsonl` has one
//! object per line, `{"file_name", "question", "text", "masks"}`; `question` is the
//! 0-based index into the image's `questions`, `masks` a list of COCO RLE (compressed
//! string or run list) of the image's size. All four keys are required; blank lines are
//! skipped. A question without a line is scored as text `""` with no masks and counted
//! in `missing`. An unknown `file_name`, an out-of-range `question`, a second line for
//! the same question, a mask of another size, an RLE that does not decode (bad
//! character, runs that do not add up to `height × width`) and malformed JSON are errors
//! that name the file and line. Every listed mask counts as a prediction, an all-zero
//! one included. `DATA.json` obeys the data readers' rules, checked by the same function
//! ([`crate::data::sample::check_muse`]): sizes of at most 2²⁸ pixels, one answer list
//! (and answer text, if any) per question, one `{seg}`/`<seg>` per annotation in each
//! answer text, RLE of the image's size, relative image paths, one record per image.
//!
//! Notation per question: `P` predicted masks, `G` ground-truth masks (the question's
//! `answers` entry), `I(p,g)` / `U(p,g)` the intersection / union pixel counts,
//! `IoU = I/U` with `IoU = 1` when `U = 0` (empty vs empty).
//!
//! **MUSE protocol** (multi-target, after PixelLM but deterministic).
//! 1. Weights `w(p,g) = ⌊10¹² · I / U⌋` (exact integer arithmetic in 128 bits;
//!    `10¹²` when `U = 0`). The assignment maximizes `Σ w` over one-to-one pairings
//!    (Kuhn–Munkres from `pathfinding`, the matrix padded with zeros to a square).
//!    Distinct IoUs of masks under 10⁶ pixels differ by at least 10⁻¹², so their
//!    weights differ; the chosen assignment's ΣIoU is within `|P|·10⁻¹²` of the
//!    maximum.
//! 2. Ties are broken lexicographically: among all maximizing assignments, prediction 0
//!    takes the lowest-indexed ground truth it can (with "unmatched" ranked after every
//!    ground truth), then prediction 1, and so on ([`assign::assign`] re-solves the
//!    remaining rows with the choice fixed and keeps it when the optimum is unchanged).
//!    The result is a function of the IoU matrix alone.
//! 3. An assigned pair with `w = 0` (IoU 0) counts as unmatched. Each matched pair adds
//!    its IoU to the question's numerator, `I` to `ΣI` and `U` to `ΣU`; each unmatched
//!    prediction and each unmatched ground truth adds its area to `ΣU`.
//! 4. The question adds `max(|P|, |G|)` to the gIoU denominator; a question with no
//!    ground truth and no prediction adds 1 to the denominator and 1 to the numerator.
//! 5. `muse.giou = Σ numerators / Σ denominators`, `muse.ciou = ΣI / ΣU` (1 when
//!    `ΣU = 0`), `muse.boundary_iou` = mean Boundary IoU over matched pairs (`null` when
//!    none). Boundary IoU (Cheng et al. 2021) uses the boundary `mask − erode(mask)`
//!    with a 3×3 structuring element applied `d = max(1, round(ratio · diagonal))` times (half to even, as Python's `round`)
//!    (`ratio` = `--dilation-ratio`, default 0.02), pixels outside the image counting as
//!    background, and IoU 1 for two empty boundaries.
//!
//! How this differs from PixelLM's evaluation, and why: PixelLM matches predictions to
//! targets with a cost of BCE + Dice evaluated at randomly sampled points of the mask
//! logits, and scores unmatched predictions from unthresholded logits, so its numbers
//! move with the sampling seed and need the model's logits; its GPT-assisted variant
//! also depends on a ChatGPT version. Here the inputs are binary masks only (what any
//! model can export), the matching cost is the exact IoU on every pixel, the
//! assignment is unique (tie rule above), and unmatched masks are penalized through
//! the union and the `max(|P|,|G|)` denominator. Same inputs, byte-identical report.
//!
//! **LISA protocol** (single target). Per question, the prediction is the union of the
//! predicted masks and the target the union of the ground-truth masks; `IoU` with empty
//! vs empty = 1. `lisa.giou` = mean IoU over questions, `lisa.ciou = ΣI / ΣU` (1 when
//! `ΣU = 0`).
//!
//! **CHAIR** (Rohrbach et al. 2018; POPEN Eq. 7). The vocabulary has one object per
//! line, `canonical, synonym, synonym, ...` (`#` starts a comment line; blank lines
//! skipped). Text (and each term) is lower-cased and split into words made of
//! alphabetic characters only (`t-shirt` → `t shirt`). Scanning left to right, at each
//! position the longest term (in words) that matches wins and the scan resumes after
//! it; otherwise the scan moves one word on. A term also matches its plural: its last
//! word with `es` added when it ends in `s`, `x`, `ch` or `sh`, a final `y` replaced by
//! `ies`, otherwise `s` added (literally, so `toy` → `toies`; list `toys` as a synonym
//! where English disagrees). A term written in the vocabulary wins over another term's
//! plural form; a term listed under two objects is an error. Each match is a mention
//! of its canonical object (repeated mentions count again). The image's objects are
//! the canonical names found (by the same matcher) in the `category_name`s of
//! `ann_list`, or of every answer annotation of the image when `ann_list` is absent; a
//! category with no vocabulary term stands for itself. A mention whose canonical object
//! is not among the image's objects is a hallucination. Every question is one response
//! (a missing one is the empty text). `chair_s` = responses with at least one
//! hallucination / all responses; `chair_i` = hallucinated mentions / all mentions
//! (`null` when there are no mentions). Without `--vocab` the world's vocabulary
//! ([`crate::data::vocab::vocab_text`], the one the world's corrector uses) is used.
//!
//! **Localization error** (Supp D.3). Over MUSE-matched pairs, the share whose IoU with
//! its ground truth is below 0.75 while its IoU with some *other* object of the image
//! is above 0.25 (both strict, compared exactly as `4I < 3U` and `4I > U`). The objects
//! are `ann_list` (every answer annotation of the image when absent); "other" means a
//! mask not pixel-identical to the matched ground truth. `null` when nothing matched.
//!
//! **No-target accuracy** (GSVA's N-acc). Over questions with no ground truth, the share
//! that got no predicted mask (`null` when there are none).
//!
//! **By targets**. Every metric above, recomputed over questions with at most
//! `--few-max` (default 3) ground-truth masks (`few`, no-target questions included) and
//! over the rest (`many`), as MUSE's test splits.
//!
//! Reductions: images are scored in parallel (rayon), per-question results are
//! collected in input order and summed sequentially, so the report does not depend on
//! the thread count (tested at 1, 2 and 3 threads).
//!
//! Representation: every mask is decoded once to its foreground intervals in COCO's
//! column-major pixel order ([`raster::Runs`]), never to a dense image. Intersections
//! and unions are interval merges (O(runs), not O(pixels)); the boundary is computed on
//! per-column intervals (vertical erosion shrinks each run by `d`, horizontal erosion
//! intersects `2d+1` neighbouring columns). Both are tested equal to the mask kernels'
//! CPU twins (`pair_counts_cpu`, `boundary_iou_cpu`) on dense row-major masks, which
//! also shows that the transposed frame changes nothing.
pub mod assign;
pub mod chair;
pub mod correlation;
pub mod eval;
pub mod masks;
pub mod raster;
pub mod separability;

pub use correlation::pearson;
pub use eval::{evaluate, evaluate_files, EvalConfig, Metrics, Report};
