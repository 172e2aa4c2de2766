//! `RUN/loss.png`: the loss curve and its named parts, drawn with `plotters`.
//!
//! Text needs a font, and a machine may have none installed, so DejaVu Sans is embedded
//! (the `dejavu` crate, about 0.7 MB; only the one face is linked) and registered with
//! plotters' `ab_glyph` renderer.  The bitmap is encoded with the crate's own `image`
//! and written atomically.
use crate::error::{Error, Result};
use crate::fsio::write_atomic_with;
use crate::train::log::LossPoint;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

/// `RUN/loss.png`.
pub const LOSS_PLOT_FILE: &str = "loss.png";
/// Image size in pixels.
const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;
/// The family name the embedded font is registered under.
const FONT: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| {
        ok = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Unsupported(
            "the embedded plot font does not load".into(),
        ))
    }
}

/// Draws `points` (the total loss and each part against the step) into an RGB buffer
/// of `WIDTH × HEIGHT`.
fn draw(points: &[LossPoint], title: &str, buf: &mut [u8]) -> Result<()> {
    let err = |e: String| Error::Unsupported(format!("drawing the loss plot: {e}"));
    let root = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut names: Vec<String> = Vec::new();
    for p in points {
        for (n, _) in &p.parts {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let finite = |v: f64| v.is_finite().then_some(v);
    let values = points
        .iter()
        .flat_map(|p| std::iter::once(p.loss).chain(p.parts.iter().map(|(_, v)| *v)))
        .filter_map(finite);
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(0.0), if hi > lo { hi } else { lo + 1.0 })
    } else {
        (0.0, 1.0)
    };
    let first = points.first().map_or(0, |p| p.step);
    let last = points.last().map_or(1, |p| p.step).max(first + 1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(first as f64..last as f64, lo..hi * 1.05)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("loss")
        .label_style((FONT, 14))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let series = std::iter::once(("loss".to_string(), None))
        .chain(names.iter().map(|n| (n.clone(), Some(n))));
    for (i, (label, part)) in series.enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let width = if part.is_none() { 3 } else { 1 };
        let pts: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|p| {
                let v = match part {
                    None => p.loss,
                    Some(n) => p.parts.iter().find(|(k, _)| k == n)?.1,
                };
                Some((p.step as f64, finite(v)?))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(width)))
            .map_err(|e| err(e.to_string()))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Writes the loss curve of `points` to `path` as a PNG, atomically.
pub fn write_loss_plot(path: &Path, points: &[LossPoint], title: &str) -> Result<()> {
    register_font()?;
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    draw(points, title, &mut buf)?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf).expect("buffer is WIDTH×HEIGHT×3");
    write_atomic_with(path, |w| {
        let mut cursor = std::io::Cursor::new(Vec::new());
        img.write_to(&mut cursor, image::ImageFormat::Png)
            .map_err(std::io::Error::other)?;
        w.write_all(cursor.get_ref())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_is_a_png_with_the_curve_drawn() {
        let pts: Vec<LossPoint> = (1..=37u64)
            .map(|s| LossPoint {
                step: s * 3,
                loss: 4.0 / (1.0 + s as f64 * 0.2),
                parts: vec![
                    ("ce".into(), 3.0 / (1.0 + s as f64 * 0.2)),
                    ("dice".into(), 1.0 / (1.0 + s as f64 * 0.1)),
                ],
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("popen-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(LOSS_PLOT_FILE);
        write_loss_plot(&p, &pts, "test run").unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        // the thick total-loss line and text put many non-white pixels in the picture
        let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(inked > 2000, "only {inked} pixels drawn");
        // an empty log still draws axes
        write_loss_plot(&p, &[], "empty").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
