//! `popen data generate|show`: write the embedded world as a MUSE-schema data set,
//! and draw overlays of any MUSE-schema file.
use anyhow::{bail, Context};
use popen::data::muse::{MuseImage, Segmentation};
use popen::data::paths::resolve_in_root;
use popen::data::world::{self, overlay, Split, WorldConfig};
use popen::data::Mask;
use std::path::{Path, PathBuf};

/// White pixels between the picture and its overlay in `data show`.
const SIDE_GAP: usize = 4;

/// Arguments of `popen data`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Generate samples of the embedded world: DIR/<split>.json (MUSE schema) + DIR/images/*.png.
    Generate(GenArgs),
    /// Draw each of the first N images of a MUSE-schema file beside its coloured, labelled masks.
    Show(ShowArgs),
}

#[derive(clap::Args)]
pub struct GenArgs {
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Data-set seed; sample i of a split depends only on (seed, split, i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image height in pixels.
    #[arg(long, default_value_t = 96)]
    pub height: usize,
    /// Image width in pixels.
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    /// Questions per image.
    #[arg(long, default_value_t = 3)]
    pub questions: usize,
    /// Split: train, val or test (test also writes test_few.json and test_many.json).
    #[arg(long, default_value = "train")]
    pub split: String,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// A MUSE-schema JSON file (e.g. DIR/train.json); image paths are relative to its folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory for the overlays.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images to draw.
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// Upscaling factor of the overlay (nearest neighbour), so labels stay readable.
    #[arg(long, default_value_t = 3)]
    pub scale: usize,
    /// Also write every object's mask as a grey PNG: <image>_obj<k>_<category>.png.
    #[arg(long)]
    pub masks: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.cmd {
        Cmd::Generate(g) => generate(g),
        Cmd::Show(s) => show(s),
    }
}

fn generate(g: GenArgs) -> anyhow::Result<()> {
    let split: Split = g.split.parse()?;
    let cfg = WorldConfig {
        height: g.height,
        width: g.width,
        questions: g.questions,
    };
    cfg.validate()?;
    if g.n == 0 {
        bail!("--n must be at least 1");
    }
    std::fs::create_dir_all(&g.out)
        .with_context(|| format!("cannot create output directory {}", g.out.display()))?;
    let bar = indicatif::ProgressBar::new(g.n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} samples ({per_sec})",
        )
        .expect("progress template"),
    );
    let t0 = std::time::Instant::now();
    let summary = world::write_dataset(&g.out, &cfg, g.seed, split, g.n, &|| bar.inc(1))
        .with_context(|| format!("writing the {} split to {}", split.name(), g.out.display()))?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} images, {} questions ({} no-target) in {:.2} s ({:.0} samples/s)",
        summary.images,
        summary.questions,
        summary.no_target,
        secs,
        summary.images as f64 / secs
    );
    for p in &summary.json {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn decode(seg: &Segmentation, h: usize, w: usize, path: &Path) -> anyhow::Result<Mask> {
    match seg {
        Segmentation::Rle(r) => {
            // checked before decoding: the RLE's own size would otherwise decide how
            // much is allocated
            if r.size != [h as u32, w as u32] {
                bail!(
                    "{}: RLE size is {}x{} but the image is {h}x{w}",
                    path.display(),
                    r.size[0],
                    r.size[1]
                );
            }
            Ok(r.to_rle()?.to_mask()?)
        }
        Segmentation::Polygons(_) => {
            bail!(
                "{}: polygon segmentations are not drawn by `data show` (image {h}x{w})",
                path.display()
            )
        }
    }
}

fn show(s: ShowArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&s.data)
        .with_context(|| format!("reading {}", s.data.display()))?;
    let recs: Vec<MuseImage> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a list of MUSE records", s.data.display()))?;
    let root = s.data.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(&s.out)
        .with_context(|| format!("cannot create output directory {}", s.out.display()))?;
    for (i, r) in recs.iter().take(s.n).enumerate() {
        let img_path = resolve_in_root(root, &r.file_name, &s.data, &format!("[{i}].file_name"))?;
        let img = overlay::load_rgb(&img_path)?;
        let (h, w) = (img.height, img.width);
        let anns = r
            .ann_list
            .clone()
            .unwrap_or_else(|| r.answers.iter().flatten().cloned().collect());
        let masks: Vec<Mask> = anns
            .iter()
            .map(|a| decode(&a.segmentation, h, w, &s.data))
            .collect::<anyhow::Result<_>>()
            .with_context(|| format!("record {i} ({})", r.file_name))?;
        let refs: Vec<&Mask> = masks.iter().collect();
        let labels: Vec<String> = anns.iter().map(|a| a.category_name.clone()).collect();
        let ov = overlay::overlay(&img, &refs, &labels, s.scale)?;
        // The plain picture beside the overlay, so the objects' own colours show too.
        let ov = overlay::side_by_side(&overlay::upscale(&img, s.scale), &ov, SIDE_GAP);
        let stem = Path::new(&r.file_name)
            .file_stem()
            .and_then(|x| x.to_str())
            .unwrap_or("image");
        if s.masks {
            for (k, (m, label)) in masks.iter().zip(&labels).enumerate() {
                let safe: String = label
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                overlay::save_mask_png(m, &s.out.join(format!("{stem}_obj{k}_{safe}.png")))?;
            }
        }
        let out = s.out.join(format!("{stem}_overlay.png"));
        overlay::save_png(&ov, &out)?;
        println!("{}", out.display());
        for (q, t) in r.questions.iter().zip(r.text_answers.iter().flatten()) {
            println!("  Q: {q}\n  A: {t}");
        }
    }
    Ok(())
}
