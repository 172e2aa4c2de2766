//! The embedded world: a procedural generator of reasoning-segmentation data that
//! needs no download.  Each [`Scene`] is one rendered image (RGB, textured background,
//! lighting and colour jitter, occlusion) with the instance mask of every object, the
//! ground-truth object list, and a few questions whose answers carry one `<seg>` per
//! target.  Scene types hold strong co-occurrence priors (fork with knife, mouse with
//! laptop), so a small model learns them and names absent objects: the hallucinations
//! POPEN's text preference fixes.  Deterministic: a scene depends only on
//! `(seed, split, index)` and the size, so rayon can build scenes in any order.  A
//! scene exports to MUSE records ([`Scene::to_muse`]), which the readers turn into the
//! crate's per-question [`Sample`](crate::data::sample::Sample)s.
//!
//! ```
//! use popen::data::world::{generate, Split, WorldConfig};
//! let cfg = WorldConfig::default();
//! let s = generate(&cfg, 7, Split::Train, 0).unwrap();
//! assert_eq!(s.image.height, cfg.height);
//! for qa in &s.qas {
//!     assert_eq!(qa.answer.matches("<seg>").count(), qa.targets.len());
//! }
//! ```
pub mod categories;
pub mod designs;
pub mod instructions;
pub mod overlay;
pub mod render;
pub mod rng;
pub mod scenes;
pub mod shapes;

use crate::data::muse::{MuseAnn, MuseImage, RleJson, Segmentation, MUSE_SEG};
use crate::data::sample::SEG;
use crate::data::{Mask, Rle};
use crate::error::{Error, Result};
use categories::CATEGORIES;
pub use instructions::{Family, Qa, NO_TARGET_ANSWERS as NO_TARGET_ANSWERS_PUB};
pub use render::{Layout, RgbImage};
use rng::{mix, Rng};
use std::path::{Path, PathBuf};

/// Smallest image side the world draws (objects need a few pixels each).
pub const MIN_SIDE: usize = 48;
/// Largest image side (keeps one sample's memory bounded).
pub const MAX_SIDE: usize = 2048;
/// Targets at most this many count as "few-target" in the test split (MUSE's cut).
pub const FEW_TARGETS_MAX: usize = 3;

/// Size and question count of generated samples.
#[derive(Clone, Debug, PartialEq)]
pub struct WorldConfig {
    /// Image height in pixels, [`MIN_SIDE`]..=[`MAX_SIDE`] (default 96).
    pub height: usize,
    /// Image width in pixels, [`MIN_SIDE`]..=[`MAX_SIDE`] (default 128).
    pub width: usize,
    /// Questions per image.
    pub questions: usize,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            height: 96,
            width: 128,
            questions: 3,
        }
    }
}

impl WorldConfig {
    /// `Err` naming the bad field when a size is out of range.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("height", self.height), ("width", self.width)] {
            if !(MIN_SIDE..=MAX_SIDE).contains(&v) {
                return Err(Error::arg(
                    "world",
                    format!("{name} {v} is out of range: the world draws images with sides {MIN_SIDE}..={MAX_SIDE}"),
                ));
            }
        }
        if self.questions == 0 {
            return Err(Error::arg(
                "world",
                "questions per image must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Data split; each has its own seed stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training scenes (`train`).
    Train,
    /// Validation scenes (`val`).
    Val,
    /// Test scenes (`test`); written also as few- and many-target parts.
    Test,
}

impl Split {
    /// The split's name as written in file names and parsed by `FromStr`:
    /// `train`, `val` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
    fn id(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Val => 2,
            Split::Test => 3,
        }
    }
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "val" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            _ => Err(Error::arg(
                "split",
                format!("unknown split `{s}` (use train, val or test)"),
            )),
        }
    }
}

/// One object in a scene with its visible-pixel mask.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Category id into [`categories::CATEGORIES`].
    pub category: usize,
    /// The category's name ("apple"), as in the answers and the MUSE `category_name`.
    pub name: &'static str,
    /// The colour word of this instance ("red").
    pub colour: &'static str,
    /// The object's visible pixels after occlusion, image-sized.
    pub mask: Mask,
}

/// One generated scene: the image, its objects and its questions.
#[derive(Clone, Debug)]
pub struct Scene {
    /// The split the scene was generated for.
    pub split: Split,
    /// Index of the scene within its split (with the seed and split, fixes the scene).
    pub index: usize,
    /// Scene type id into [`scenes::SCENES`].
    pub scene: usize,
    /// The placed objects and lighting the image was drawn from.
    pub layout: Layout,
    /// The rendered image, `cfg.height × cfg.width`.
    pub image: RgbImage,
    /// Objects in depth order (back to front).
    pub objects: Vec<Object>,
    /// The questions with their answers and targets: at most `cfg.questions`, no two
    /// with the same question or answer.
    pub qas: Vec<Qa>,
}

/// The seed of scene `index` of `split` under data-set seed `seed`.
pub fn sample_seed(seed: u64, split: Split, index: usize) -> u64 {
    mix(&[seed, split.id(), index as u64])
}

/// Generates one scene; the same arguments always give the same scene.
pub fn generate(cfg: &WorldConfig, seed: u64, split: Split, index: usize) -> Result<Scene> {
    cfg.validate()?;
    let mut rng = Rng::new(sample_seed(seed, split, index));
    let scene = rng.below(scenes::SCENES.len());
    let cats = scenes::draw_categories(scene, &mut rng);
    let mut want = Vec::new();
    for c in cats {
        let max = CATEGORIES[c].max_count as usize;
        // Mostly one instance; several often enough for counting questions.
        let n = if max > 1 && rng.chance(0.45) {
            2 + rng.below(max - 1)
        } else {
            1
        };
        want.extend(std::iter::repeat_n(c, n));
    }
    let layout = render::place(scene, &want, cfg.height, cfg.width, &mut rng);
    let (image, ids) = render::render(&layout, true);
    let (h, w) = (cfg.height, cfg.width);
    let objects: Vec<Object> = layout
        .objects
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let cat = &CATEGORIES[p.category];
            let id = k as u16 + 1;
            Object {
                category: p.category,
                name: cat.name,
                colour: cat.colours[p.colour].word,
                mask: Mask::from_vec(h, w, ids.iter().map(|&v| u8::from(v == id)).collect())
                    .expect("mask size matches image"),
            }
        })
        .collect();
    let views: Vec<instructions::ObjView> = objects
        .iter()
        .map(|o| instructions::ObjView {
            category: o.category,
            colour: o.colour,
            centre: centroid(&o.mask),
        })
        .collect();
    let qas = instructions::generate(scene, &views, h, w, cfg.questions, &mut rng);
    Ok(Scene {
        split,
        index,
        scene,
        layout,
        image,
        objects,
        qas,
    })
}

/// A mask's centre of mass (x, y) in pixels, pixel centres at +0.5; (0, 0) when empty.
/// The instruction generator orders objects by it.
pub fn centroid(m: &Mask) -> (f32, f32) {
    let (mut sx, mut sy, mut n) = (0f64, 0f64, 0f64);
    for y in 0..m.height {
        for x in 0..m.width {
            if m.get(y, x) != 0 {
                sx += x as f64 + 0.5;
                sy += y as f64 + 0.5;
                n += 1.0;
            }
        }
    }
    if n == 0.0 {
        (0.0, 0.0)
    } else {
        ((sx / n) as f32, (sy / n) as f32)
    }
}

impl Scene {
    /// The image's file name inside `images/`.
    pub fn file_stem(&self) -> String {
        format!("{}_{:06}", self.split.name(), self.index)
    }
    /// The scene type's name.
    pub fn scene_name(&self) -> &'static str {
        scenes::SCENES[self.scene].name
    }
    /// Names of the categories present (sorted, unique): CHAIR's and the corrector's list.
    pub fn object_names(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.objects.iter().map(|o| o.name).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
    /// How many instances of `name` the scene holds.
    pub fn count(&self, name: &str) -> usize {
        self.objects.iter().filter(|o| o.name == name).count()
    }
    /// Absent categories a prior-driven model would name here, most tempting first.
    pub fn tempting_absent(&self) -> Vec<&'static str> {
        let present: Vec<usize> = self.objects.iter().map(|o| o.category).collect();
        scenes::tempting_absent(self.scene, &present)
            .into_iter()
            .map(|c| CATEGORIES[c].name)
            .collect()
    }
    fn ann(&self, k: usize) -> MuseAnn {
        let o = &self.objects[k];
        MuseAnn {
            category_name: o.name.to_string(),
            bbox: o.mask.bbox().to_vec(),
            segmentation: Segmentation::Rle(RleJson::from_rle(&Rle::from_mask(&o.mask))),
        }
    }
    /// The MUSE record: questions, per-question target annotations in `<seg>` order,
    /// answers with MUSE's `{seg}` placeholder, and `ann_list` holding every object
    /// (Alg. 1's proposals).
    pub fn to_muse(&self, file_name: &str) -> MuseImage {
        MuseImage {
            file_name: file_name.to_string(),
            coco_url: None,
            height: self.image.height as u32,
            width: self.image.width as u32,
            questions: self.qas.iter().map(|q| q.question.clone()).collect(),
            answers: self
                .qas
                .iter()
                .map(|q| q.targets.iter().map(|&k| self.ann(k)).collect())
                .collect(),
            text_answers: Some(
                self.qas
                    .iter()
                    .map(|q| q.answer.replace(SEG, MUSE_SEG))
                    .collect(),
            ),
            ann_list: Some((0..self.objects.len()).map(|k| self.ann(k)).collect()),
        }
    }
    /// The image as PNG bytes.
    pub fn png(&self) -> Result<Vec<u8>> {
        overlay::png_bytes(&self.image)
    }
    /// The image with every object's mask and name drawn over it, upscaled `up`×.
    pub fn overlay(&self, up: usize) -> Result<RgbImage> {
        let masks: Vec<&Mask> = self.objects.iter().map(|o| &o.mask).collect();
        let labels: Vec<String> = self.objects.iter().map(|o| o.name.to_string()).collect();
        overlay::overlay(&self.image, &masks, &labels, up)
    }
}

/// What [`write_dataset`] wrote.
#[derive(Clone, Debug)]
pub struct DatasetSummary {
    /// JSON files written (the split, and for test its few/many-target parts).
    pub json: Vec<PathBuf>,
    /// Images (scenes) written.
    pub images: usize,
    /// Questions over all images.
    pub questions: usize,
    /// Questions whose answer has no target.
    pub no_target: usize,
}

/// Writes `n` scenes of `split` to `dir`: `dir/<split>.json` (a list of MUSE
/// records) and `dir/images/<split>_NNNNNN.png`; for the test split also
/// `test_few.json` (questions with ≤ 3 targets) and `test_many.json` (> 3).
/// Scenes are built in parallel; the output does not depend on the thread count.
/// `tick` is called once per finished scene (for a progress bar).
pub fn write_dataset(
    dir: &Path,
    cfg: &WorldConfig,
    seed: u64,
    split: Split,
    n: usize,
    tick: &(dyn Fn() + Sync),
) -> Result<DatasetSummary> {
    use rayon::prelude::*;
    cfg.validate()?;
    if n == 0 {
        return Err(Error::arg("world", "n must be at least 1 scene"));
    }
    let img_dir = dir.join("images");
    std::fs::create_dir_all(&img_dir).map_err(|e| Error::io(&img_dir, e))?;
    let records: Vec<MuseImage> = (0..n)
        .into_par_iter()
        .map(|i| {
            let s = generate(cfg, seed, split, i)?;
            let name = format!("images/{}.png", s.file_stem());
            let path = dir.join(&name);
            crate::fsio::write_atomic(&path, &s.png()?)?;
            tick();
            Ok(s.to_muse(&name))
        })
        .collect::<Result<_>>()?;
    let mut json = vec![write_json(dir, split.name(), &records)?];
    if split == Split::Test {
        let few = filter_questions(&records, |k| k <= FEW_TARGETS_MAX);
        let many = filter_questions(&records, |k| k > FEW_TARGETS_MAX);
        json.push(write_json(dir, "test_few", &few)?);
        json.push(write_json(dir, "test_many", &many)?);
    }
    let questions = records.iter().map(|r| r.questions.len()).sum();
    let no_target = records
        .iter()
        .flat_map(|r| r.answers.iter())
        .filter(|a| a.is_empty())
        .count();
    Ok(DatasetSummary {
        json,
        images: records.len(),
        questions,
        no_target,
    })
}

/// Keeps the questions whose target count passes `keep`; drops images left with none.
pub fn filter_questions(records: &[MuseImage], keep: impl Fn(usize) -> bool) -> Vec<MuseImage> {
    records
        .iter()
        .filter_map(|r| {
            let idx: Vec<usize> = (0..r.questions.len())
                .filter(|&q| keep(r.answers[q].len()))
                .collect();
            if idx.is_empty() {
                return None;
            }
            let mut out = r.clone();
            out.questions = idx.iter().map(|&q| r.questions[q].clone()).collect();
            out.answers = idx.iter().map(|&q| r.answers[q].clone()).collect();
            out.text_answers = r
                .text_answers
                .as_ref()
                .map(|t| idx.iter().map(|&q| t[q].clone()).collect());
            Some(out)
        })
        .collect()
}

fn write_json(dir: &Path, stem: &str, records: &[MuseImage]) -> Result<PathBuf> {
    let path = dir.join(format!("{stem}.json"));
    let text = serde_json::to_string(records).map_err(|e| Error::Json {
        path: path.clone(),
        line: None,
        msg: e.to_string(),
    })?;
    crate::fsio::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}
