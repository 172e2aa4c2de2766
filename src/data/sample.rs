//! The one sample type every reader produces: an image, one question about it, the
//! answer text with a `<seg>` placeholder per target, one mask per target, and every
//! annotated object of the image.
//!
//! Readers (in [`super::readers`]), re-exported here:
//! - [`load_muse`]: MUSE JSON (also what the embedded world writes; in memory,
//!   [`muse_to_samples`]);
//! - [`load_reasonseg`]: ReasonSeg's LabelMe JSON files beside the images;
//! - [`load_refcoco`]: refCOCO / refCOCO+ / refCOCOg (`refs(unc|umd|google).p` +
//!   `instances.json`);
//! - [`load_grandf`]: GranD-f grounded captions (GLaMM's GCG JSON).
//!
//! Readers validate everything but the pixels: JSON shape, mask sizes, paths (which
//! stay inside their root: [`super::paths::resolve_in_root`]).  Images
//! are decoded only by [`load_image`], so a corrupt image is an `Err` naming the file at
//! the point it is used (or counted by [`check_images`]), never a panic.
use std::path::{Path, PathBuf};

use super::mask::Mask;
use crate::error::{Error, Result};

pub use super::readers::grandf::load_grandf;
pub use super::readers::muse::{
    check_mask_budget, check_muse, check_record, decoded_mask_bytes, image_samples, load_muse,
    load_muse_entries, load_muse_within, muse_to_samples, parse_muse_entries, MuseEntry,
    MAX_DECODED_MASK_BYTES,
};
pub use super::readers::reasonseg::{load_reasonseg, load_reasonseg_flagged};
pub use super::readers::refcoco::load_refcoco;

/// The placeholder that stands for one target's mask in answer text, and the
/// tokenizer's segmentation token (always one token).  MUSE files spell it
/// [`MUSE_SEG`](super::muse::MUSE_SEG).
pub const SEG: &str = "<seg>";

/// Largest image (pixels) a reader accepts: masks are one byte per pixel, so a size
/// field of 10⁵ × 10⁵ would otherwise allocate 10 GB per target before anything else
/// could notice it is wrong.  16384 × 16384.
pub const MAX_IMAGE_PIXELS: usize = 1 << 28;

/// `Err(Data)` unless `height × width` is a plausible, non-empty image size.
pub(crate) fn check_size(path: &Path, field: &str, height: usize, width: usize) -> Result<()> {
    if height == 0 || width == 0 {
        return Err(data_err(
            path,
            field,
            format!("image size {height}x{width} is empty"),
        ));
    }
    if height.saturating_mul(width) > MAX_IMAGE_PIXELS {
        return Err(data_err(
            path,
            field,
            format!("image size {height}x{width} is over {MAX_IMAGE_PIXELS} pixels"),
        ));
    }
    Ok(())
}

/// One segmented object: its category (or phrase) and its mask.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// Category name (MUSE, refCOCO), label (ReasonSeg) or grounded phrase (GranD-f).
    pub category: String,
    /// `height × width` of the sample; 1 = object, 0 = background, and
    /// [`IGNORE`](super::mask::IGNORE) = excluded from scoring (ReasonSeg).
    pub mask: Mask,
}

/// One question about one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Stable id of the image within its data set (not unique across questions).
    pub image_id: String,
    /// Absolute or root-relative path of the image file (not opened by the readers).
    pub image_path: PathBuf,
    /// Image height, in pixels (every mask's height).
    pub height: usize,
    /// Image width, in pixels (every mask's width).
    pub width: usize,
    /// The instruction: a MUSE / ReasonSeg question, a refCOCO referring sentence, or
    /// GranD-f's fixed caption request.
    pub question: String,
    /// Index of this question among the image's questions (or a ref's sentences).
    pub question_index: usize,
    /// Answer text with one [`SEG`] per target, in target order; `None` when the data
    /// set has no answer text (ReasonSeg, refCOCO).
    pub answer: Option<String>,
    /// One per `<seg>`, in order.
    pub targets: Vec<Target>,
    /// Every annotated object in the image (CHAIR's object list, Alg. 1's proposals).
    pub objects: Vec<Target>,
}

/// Decode the sample's image as RGB.  `Err(Image)` naming the file when it cannot be
/// read or decoded, or when its size is not the sample's `height × width` (the masks
/// would not line up).
pub fn load_image(sample: &Sample) -> Result<image::RgbImage> {
    let path = &sample.image_path;
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::Image {
            path: path.clone(),
            msg: format!("cannot open: {e}"),
        })?
        .with_guessed_format()
        .map_err(|e| Error::Image {
            path: path.clone(),
            msg: format!("cannot read: {e}"),
        })?
        .decode()
        .map_err(|e| Error::Image {
            path: path.clone(),
            msg: format!("does not decode: {e}"),
        })?
        .into_rgb8();
    let (w, h) = img.dimensions();
    if h as usize != sample.height || w as usize != sample.width {
        return Err(Error::Image {
            path: path.clone(),
            msg: format!(
                "image is {h}x{w} (h x w) but its annotation says {}x{}",
                sample.height, sample.width
            ),
        });
    }
    Ok(img)
}

/// Try to decode every distinct image of `samples`; returns the ones that fail, with
/// their errors (the documented way to skip bad images: drop samples whose
/// `image_path` is listed, and report the count).
pub fn check_images(samples: &[Sample]) -> Vec<(PathBuf, Error)> {
    let mut seen = std::collections::HashSet::new();
    let mut bad = Vec::new();
    for s in samples {
        if seen.insert(s.image_path.clone()) {
            if let Err(e) = load_image(s) {
                bad.push((s.image_path.clone(), e));
            }
        }
    }
    bad
}

/// Read a whole file, naming it in the error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Parse JSON into `T`; the error names the file, the line and the field path
/// (`[3].answers[1][0].segmentation`).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.inner();
        Error::Json {
            path: path.to_path_buf(),
            line: Some(inner.line()),
            msg: if field.is_empty() || field == "." {
                inner.to_string()
            } else {
                format!("field `{field}`: {inner}")
            },
        }
    })
}

/// `Err(Data)` shorthand.
pub(crate) fn data_err(path: &Path, field: impl Into<String>, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        field: field.into(),
        msg: msg.into(),
    }
}

/// Decode a COCO segmentation (polygons or RLE) at `height × width`.  An RLE whose size
/// is not the image's, or whose runs do not cover it, is an `Err(Data)` naming `field`.
pub(crate) fn seg_to_mask(
    seg: &super::muse::Segmentation,
    height: usize,
    width: usize,
    path: &Path,
    field: &str,
) -> Result<Mask> {
    use super::muse::Segmentation;
    match seg {
        Segmentation::Polygons(polys) => super::polygon::mask_from_polygons(polys, height, width)
            .map_err(|e| data_err(path, field, e.to_string())),
        Segmentation::Rle(r) => {
            let [h, w] = r.size;
            if h as usize != height || w as usize != width {
                return Err(data_err(
                    path,
                    format!("{field}.size"),
                    format!("RLE size is {h}x{w} but the image is {height}x{width}"),
                ));
            }
            r.to_rle()
                .and_then(|r| r.to_mask())
                .map_err(|e| data_err(path, format!("{field}.counts"), e.to_string()))
        }
    }
}
