//! The MUSE JSON schema (one record per image), as serde types.  The embedded world
//! writes it and the readers load it, so everything downstream sees one sample type.
//! Loading with validation (files, fields, masks) lives beside these types.
use serde::{Deserialize, Serialize};

/// MUSE's spelling of the placeholder in `text_answers`; readers turn it into the
/// crate's [`SEG`](super::sample::SEG) (and accept `SEG` itself as written).
pub const MUSE_SEG: &str = "{seg}";

/// One image with its questions and, per question, the annotations its answer
/// segments (one per `<seg>`, in order).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MuseImage {
    /// Image path relative to the data root.
    #[serde(default)]
    pub file_name: String,
    /// COCO image URL; when `file_name` is empty the readers take the image path from
    /// its last two segments (`…/<split>/<file>` gives `<split>/<file>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coco_url: Option<String>,
    /// Image height, in pixels.
    pub height: u32,
    /// Image width, in pixels.
    pub width: u32,
    /// The image's questions (reasoning instructions), one answer per question.
    pub questions: Vec<String>,
    /// Per question, the annotations of its targets, in `<seg>` order.
    pub answers: Vec<Vec<MuseAnn>>,
    /// Per question, the answer text with `{seg}` (or `<seg>`) placeholders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_answers: Option<Vec<String>>,
    /// Every annotated object in the image (CHAIR's object list; Alg. 1's proposals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ann_list: Option<Vec<MuseAnn>>,
}

/// One annotated object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MuseAnn {
    /// The object's category name.
    pub category_name: String,
    /// `[x, y, w, h]`
    #[serde(default)]
    pub bbox: Vec<f64>,
    /// The object's mask, as polygons or RLE.
    pub segmentation: Segmentation,
}

/// A COCO segmentation: polygons or RLE.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Segmentation {
    /// `[[x0, y0, x1, y1, ...], ...]`
    Polygons(Vec<Vec<f64>>),
    /// A run-length encoded mask.
    Rle(RleJson),
}

/// COCO RLE as JSON: `{"size": [h, w], "counts": "..." | [n, ...]}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RleJson {
    /// `[height, width]`
    pub size: [u32; 2],
    /// The runs, compressed or not (see [`RleCounts`]).
    pub counts: RleCounts,
}

/// Compressed string or uncompressed run list.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RleCounts {
    /// pycocotools' compressed string.
    Compressed(String),
    /// Alternating run lengths, zeros first, column-major.
    Runs(Vec<u32>),
}

impl RleJson {
    /// Decode to the crate's [`Rle`](super::rle::Rle).
    pub fn to_rle(&self) -> crate::Result<super::rle::Rle> {
        let (h, w) = (self.size[0] as usize, self.size[1] as usize);
        match &self.counts {
            RleCounts::Compressed(s) => super::rle::Rle::from_compressed(h, w, s),
            RleCounts::Runs(r) => Ok(super::rle::Rle {
                height: h,
                width: w,
                counts: r.clone(),
            }),
        }
    }
    /// Compressed JSON form of an [`Rle`](super::rle::Rle).
    pub fn from_rle(r: &super::rle::Rle) -> Self {
        RleJson {
            size: [r.height as u32, r.width as u32],
            counts: RleCounts::Compressed(r.to_compressed()),
        }
    }
}
