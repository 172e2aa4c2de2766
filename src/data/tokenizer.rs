//! Tokenizers: one trained on the world's text, and Hugging Face `tokenizer.json`
//! files (LLaMA and friends) with `<seg>` added so that it is always one token.
//!
//! LISA's users met a bug where `[SEG]` was split into several pieces in some
//! contexts, and the model then produced two masks for one target.  Here `<seg>` (and
//! `<image>`) are added as *special, unnormalized* tokens, which the `tokenizers`
//! crate extracts from the raw text before normalization and pre-tokenization, so no
//! neighbouring character or whitespace rule can split them.
use crate::data::sample::SEG;
use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerImpl,
};

/// Marks where the image features go in the prompt.
pub const IMAGE_TOKEN: &str = "<image>";
/// Padding token; [`Tok`] adds it as a special token when the vocabulary lacks it.
pub const PAD_TOKEN: &str = "<pad>";
/// Begin-of-sequence token (a loaded tokenizer may use `<|begin_of_text|>` instead).
pub const BOS_TOKEN: &str = "<s>";
/// End-of-sequence token (a loaded tokenizer may use `<|end_of_text|>` instead).
pub const EOS_TOKEN: &str = "</s>";
/// Unknown token: the world BPE's fallback for text outside its vocabulary.
pub const UNK_TOKEN: &str = "<unk>";
/// Special tokens of the world tokenizer, in id order (ids 0..6).
pub const WORLD_SPECIALS: [&str; 6] =
    [UNK_TOKEN, PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, SEG];
/// Default vocabulary size of the world tokenizer: the world's text has a few hundred
/// distinct words, so this keeps nearly every word whole.
pub const WORLD_VOCAB: usize = 800;
/// The word-boundary marker (SentencePiece's).
const SPACE_MARK: char = '\u{2581}';

fn terr(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

/// A tokenizer with the ids the model needs.
#[derive(Clone)]
pub struct Tok {
    /// The wrapped `tokenizers` tokenizer, with the special tokens added.
    pub inner: tokenizers::Tokenizer,
    /// Id of [`SEG`] (`<seg>`).
    pub seg: u32,
    /// Id of [`IMAGE_TOKEN`].
    pub image: u32,
    /// Id of [`PAD_TOKEN`].
    pub pad: u32,
    /// Id of [`BOS_TOKEN`], else of `<|begin_of_text|>`.
    pub bos: u32,
    /// Id of [`EOS_TOKEN`], else of `<|end_of_text|>`.
    pub eos: u32,
}

/// Adds `token` as a special, unnormalized, never-split token; returns its id.
pub fn add_special(tok: &mut tokenizers::Tokenizer, token: &str) -> Result<u32> {
    if let Some(id) = tok.token_to_id(token) {
        // Already in the vocabulary; still register it as added so that it is
        // extracted before pre-tokenization (a plain vocab entry can be split).
        let t = AddedToken::from(token.to_string(), true).normalized(false);
        tok.add_special_tokens([t])
            .map_err(|e| terr("adding a special token", e))?;
        return Ok(id);
    }
    let t = AddedToken::from(token.to_string(), true).normalized(false);
    tok.add_special_tokens([t])
        .map_err(|e| terr("adding a special token", e))?;
    tok.token_to_id(token)
        .ok_or_else(|| Error::Tokenizer(format!("adding `{token}` failed")))
}

/// Adds `<seg>` so that it always encodes to one id (see the module docs).
pub fn add_seg_token(tok: &mut tokenizers::Tokenizer) -> Result<u32> {
    add_special(tok, SEG)
}

impl Tok {
    fn from_inner(mut inner: tokenizers::Tokenizer) -> Result<Tok> {
        let seg = add_special(&mut inner, SEG)?;
        let image = add_special(&mut inner, IMAGE_TOKEN)?;
        let pad = add_special(&mut inner, PAD_TOKEN)?;
        let bos = inner
            .token_to_id(BOS_TOKEN)
            .or_else(|| inner.token_to_id("<|begin_of_text|>"))
            .ok_or_else(|| {
                Error::Tokenizer(format!("no begin-of-sequence token (`{BOS_TOKEN}`)"))
            })?;
        let eos = inner
            .token_to_id(EOS_TOKEN)
            .or_else(|| inner.token_to_id("<|end_of_text|>"))
            .ok_or_else(|| Error::Tokenizer(format!("no end-of-sequence token (`{EOS_TOKEN}`)")))?;
        Ok(Tok {
            inner,
            seg,
            image,
            pad,
            bos,
            eos,
        })
    }

    /// Trains a BPE tokenizer (SentencePiece-style `▁` word marks, so decoding gives
    /// the text back) on `texts` with at most `vocab_size` tokens, specials included.
    pub fn train(texts: &[String], vocab_size: usize) -> Result<Tok> {
        if texts.is_empty() {
            return Err(Error::arg("Tok::train", "no training text"));
        }
        let specials: Vec<AddedToken> = WORLD_SPECIALS
            .iter()
            .map(|s| AddedToken::from(s.to_string(), true).normalized(false))
            .collect();
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(1)
            .show_progress(false)
            .special_tokens(specials.clone())
            .build();
        let model = BPE::builder()
            .unk_token(UNK_TOKEN.to_string())
            .build()
            .map_err(|e| terr("building BPE", e))?;
        let mut t: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerImpl::new(model);
        t.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new(
            SPACE_MARK,
            PrependScheme::First,
            true,
        ))));
        t.with_decoder(Some(DecoderWrapper::Metaspace(MetaspaceDecoder::new(
            SPACE_MARK,
            PrependScheme::First,
            true,
        ))));
        t.add_special_tokens(specials.clone())
            .map_err(|e| terr("adding special tokens", e))?;
        t.train(&mut trainer, texts.iter())
            .map_err(|e| terr("training", e))?;
        let (model, n, p, pp, d) = (
            t.get_model().clone(),
            t.get_normalizer().cloned(),
            t.get_pre_tokenizer().cloned(),
            t.get_post_processor().cloned(),
            t.get_decoder().cloned(),
        );
        let mut inner: tokenizers::Tokenizer = tokenizers::Tokenizer::new(model);
        inner
            .with_normalizer(n)
            .map_err(|e| terr("normalizer", e))?;
        inner.with_pre_tokenizer(p);
        inner.with_post_processor(pp);
        inner.with_decoder(d);
        inner
            .add_special_tokens(specials)
            .map_err(|e| terr("adding special tokens", e))?;
        Tok::from_inner(inner)
    }

    /// Trains on the questions and answers of `n` world samples.
    pub fn train_world(
        cfg: &crate::data::world::WorldConfig,
        seed: u64,
        n: usize,
        vocab_size: usize,
    ) -> Result<Tok> {
        let texts = world_corpus(cfg, seed, n)?;
        Tok::train(&texts, vocab_size)
    }

    /// Loads a `tokenizer.json` (ours or a Hugging Face one) and makes sure `<seg>`,
    /// `<image>` and `<pad>` exist as single special tokens.
    ///
    /// The file is parsed as JSON here first: the `tokenizers` crate panics (an
    /// `expect` in its decoder deserializer) on some malformed JSON inside the
    /// `decoder` field, while well-formed JSON of any shape there is an error it
    /// returns.  So a syntax error is ours to report, with its line and column.
    pub fn load(path: &Path) -> Result<Tok> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str::<serde_json::Value>(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            line: Some(e.line()),
            msg: e.to_string(),
        })?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Tok::from_inner(inner)
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Ids of `text` (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| terr("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens kept (so `<seg>` shows).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| terr("decoding", e))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Every question and answer of `n` samples of the train split: the tokenizer's corpus.
pub fn world_corpus(
    cfg: &crate::data::world::WorldConfig,
    seed: u64,
    n: usize,
) -> Result<Vec<String>> {
    use crate::data::world::{generate, Split};
    use rayon::prelude::*;
    let per: Vec<Vec<String>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let s = generate(cfg, seed, Split::Train, i)?;
            Ok(s.qas
                .iter()
                .flat_map(|q| [q.question.clone(), q.answer.clone()])
                .collect())
        })
        .collect::<Result<_>>()?;
    Ok(per.into_iter().flatten().collect())
}
