//! `popen score-answers`: the log-likelihood a run gives each question's answer in a
//! MUSE-schema file, teacher-forced (one forward per batch, nothing generated).  It is
//! the threshold-free probe: greedy decoding shows only the answer a model ranks first,
//! so a model that leans towards one kind of answer looks blind even where its
//! likelihoods do tell two cases apart (`tools/presence_probe.py auc` reads this
//! command's output).
use super::model_args::DeviceArg;
use popen::backend::{Backend, OnBackend};
use popen::method::predict::{data_root, questions, LastImage};
use popen::method::pref::collect::text_example;
use popen::model::seg::SegModel;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `popen score-answers`.
#[derive(clap::Args)]
pub struct Args {
    /// A run directory (`popen train ...`'s `--out`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// MUSE-schema questions, each with its text answer (`{seg}` or `<seg>` per target;
    /// the reader writes both as `<seg>`).
    #[arg(long)]
    pub data: PathBuf,
    /// Image folder (default: the data file's folder).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// JSON Lines out: per question `file_name`, `question`, `answer`, `logp` (the sum
    /// over the answer's tokens, codebook tokens and end of sequence included, in nats)
    /// and `tokens`.
    #[arg(long)]
    pub out: PathBuf,
    /// Questions per forward.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// One scored answer (a line of `--out`).
#[derive(serde::Serialize)]
struct Line {
    file_name: String,
    question: String,
    answer: String,
    logp: f64,
    tokens: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    struct Job<'a>(&'a Args);
    impl OnBackend for Job<'_> {
        type Out = Vec<Line>;
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<Self::Out> {
            let a = self.0;
            let (model, tok) = SegModel::load(be, &a.checkpoint)?;
            let root = data_root(&a.data, &a.images);
            let items = questions(&a.data, &root)?;
            let mut out = Vec::with_capacity(items.len());
            let mut last = LastImage::default();
            let bar = super::progress::bar(items.len() as u64, "score");
            for chunk in items.chunks(a.batch) {
                let mut exs = Vec::with_capacity(chunk.len());
                let mut answers = Vec::with_capacity(chunk.len());
                for (file, s) in chunk {
                    let answer = s.answer.clone().ok_or_else(|| popen::Error::Data {
                        path: a.data.clone(),
                        field: format!("text_answers of {file}"),
                        msg: "score-answers needs each question's text answer".into(),
                    })?;
                    let px = last.pixels(s, model.cfg.image_size)?;
                    exs.push(text_example(&model.cfg, &tok, &px, &s.question, &answer)?);
                    answers.push(answer);
                }
                let pass = model.forward_pass(&exs)?;
                for (((file, s), rows), answer) in chunk.iter().zip(&pass.answer_rows).zip(answers)
                {
                    out.push(Line {
                        file_name: file.clone(),
                        question: s.question.clone(),
                        answer,
                        logp: rows.iter().map(|&r| pass.logp[r]).sum(),
                        tokens: rows.len(),
                    });
                }
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            Ok(out)
        }
    }
    let lines = a.device.run(Job(&a))?;
    let mut buf = Vec::new();
    for l in &lines {
        serde_json::to_writer(&mut buf, l)?;
        buf.write_all(b"\n")?;
    }
    popen::fsio::write_atomic(&a.out, &buf)?;
    eprintln!("{} answers scored into {}", lines.len(), a.out.display());
    Ok(())
}
