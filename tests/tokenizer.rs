//! The world tokenizer (train, save, load, round trip) and `<seg>` staying one token
//! in a LLaMA-style Hugging Face tokenizer.
use popen::data::sample::SEG;
use popen::data::tokenizer::{add_seg_token, Tok, WORLD_SPECIALS};
use popen::data::world::WorldConfig;

fn world_tok() -> Tok {
    let cfg = WorldConfig {
        height: 48,
        width: 64,
        questions: 3,
    };
    Tok::train_world(&cfg, 3, 60, 400).unwrap()
}

#[test]
fn world_tokenizer_trains_saves_loads_and_round_trips() {
    let tok = world_tok();
    assert!(
        tok.vocab_size() <= 400 + WORLD_SPECIALS.len(),
        "{}",
        tok.vocab_size()
    );
    for (i, s) in WORLD_SPECIALS.iter().enumerate() {
        assert_eq!(tok.inner.token_to_id(s), Some(i as u32), "{s}");
    }
    let text = "You could eat the two apples <seg> <seg> and the banana <seg>, rich in vitamins.";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == tok.seg).count(), 3);
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let dir = std::env::temp_dir().join(format!("popen_tok_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    tok.save(&path).unwrap();
    let back = Tok::load(&path).unwrap();
    assert_eq!(back.encode(text).unwrap(), ids);
    assert_eq!(
        (back.seg, back.pad, back.bos, back.eos),
        (tok.seg, tok.pad, tok.bos, tok.eos)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn load_reports_the_file() {
    let e = Tok::load(std::path::Path::new("/nonexistent/tokenizer.json"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/tokenizer.json"), "{e}");
}

/// Found by the `run_dir` fuzz target: control characters inside the `decoder`
/// field's strings made the `tokenizers` crate panic (an `expect` in its decoder
/// deserializer); the file is now parsed as JSON first and refused with its line.
#[test]
fn a_tokenizer_json_that_panicked_the_tokenizers_crate_is_an_error() {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer/bad_decoder_control_char.json");
    let e = Tok::load(&p).err().unwrap().to_string();
    assert!(
        e.contains("bad_decoder_control_char.json") && e.contains("control character"),
        "{e}"
    );
    // well-formed JSON of a wrong shape in the same field is the crate's own error
    let d = std::env::temp_dir().join(format!("popen_tok_shape_{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(LLAMA_STYLE_JSON).unwrap();
    j["decoder"] = serde_json::json!({"type": "Metaspace", "prepend_scheme": 7});
    std::fs::write(d.join("tokenizer.json"), j.to_string()).unwrap();
    assert!(Tok::load(&d.join("tokenizer.json")).is_err());
    std::fs::remove_dir_all(&d).ok();
}

/// A small tokenizer.json shaped like Hugging Face's LLaMA ones: BPE with byte
/// fallback over `<0xNN>` tokens, SentencePiece word marks (Metaspace, prepend on
/// the first piece only), and the usual decoder chain.  A committed fixture, which the
/// `tokenizer_hf` fuzz target loads too.
const LLAMA_STYLE_JSON: &str = include_str!("fixtures/tokenizer/llama_style.json");

#[test]
fn seg_is_one_token_in_a_llama_style_tokenizer() {
    let dir = std::env::temp_dir().join(format!("popen_llama_tok_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, LLAMA_STYLE_JSON).unwrap();
    let text = "a <seg> b<seg>.";

    // Before: `<seg>` is ordinary text and splits into pieces (the LISA bug's setting:
    // a model trained on one id per target would see two or three).
    let mut raw = tokenizers::Tokenizer::from_file(&path).unwrap();
    let before = raw.encode(text, false).unwrap();
    let toks: Vec<&str> = before.get_tokens().iter().map(|s| s.as_str()).collect();
    assert!(!toks.contains(&SEG), "{toks:?}");
    assert!(toks.len() > 6, "{toks:?}");

    // After: one id per `<seg>`, in both contexts, and decoding gives the text back.
    let seg = add_seg_token(&mut raw).unwrap();
    let enc = raw.encode(text, false).unwrap();
    let ids = enc.get_ids();
    assert_eq!(
        ids.iter().filter(|&&i| i == seg).count(),
        2,
        "{:?}",
        enc.get_tokens()
    );
    for t in enc.get_tokens() {
        assert!(
            t == SEG || !t.contains("seg"),
            "a piece of <seg> leaked: {:?}",
            enc.get_tokens()
        );
    }
    assert_eq!(raw.decode(ids, false).unwrap(), text);

    // The same through `Tok::load`, which adds `<seg>`, `<image>` and `<pad>`.
    let tok = Tok::load(&path).unwrap();
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == tok.seg).count(), 2);
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert_eq!(tok.encode("<image>").unwrap(), vec![tok.image]);
    assert_eq!((tok.bos, tok.eos), (1, 2));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn preference_pair_marks_the_corrected_tokens() {
    use popen::data::corrector::preference_pair;
    let tok = world_tok();
    let y = "Sure, I found the knife <seg>, the fork <seg> and the plate <seg>.";
    let yc = "Sure, I found the knife <seg> and the plate <seg>.";
    let p = preference_pair(&tok, y, yc).unwrap();
    let changed: String =
        p.ly.iter()
            .map(|&i| tok.decode(&p.y[i..i + 1]).unwrap())
            .collect();
    assert!(changed.contains("fork"), "{changed:?}");
    assert!(
        !changed.contains("plate") && !changed.contains("Sure"),
        "{changed:?}"
    );
    assert!(p.lyc.len() < p.ly.len());
    assert_eq!(p.y.iter().filter(|&&i| i == tok.seg).count(), 3);
}
