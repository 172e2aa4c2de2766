//! Text side of the segmentation model: the tokenizer with the codebook tokens, the
//! conversation template, and the mapping between `<seg>` in text and codebook groups
//! in the token stream.
//!
//! **Template** (LLaVA v1, `conv_vicuna_v1`): `SYSTEM USER: <image>\nQUESTION
//! ASSISTANT: ANSWER</s>`, with two documented changes for the tiny world model: the
//! system sentence is a config value (empty by default), and the newline after
//! `<image>` is a space, since the world tokenizer's vocabulary has no newline.  The
//! image token is expanded to one position per image patch.  A real LLaVA tokenizer
//! keeps the newline.
//!
//! **Codebook** (PixelLM): each `<seg>` of an answer becomes `S·L` codebook tokens
//! `[SEG0] … [SEG{S·L−1}]` (scale-major: the first `S` belong to scale 0), part of the
//! labels, so the model generates them.  A generated group that is not exactly
//! `[SEG0] … [SEG{S·L−1}]` in order is incomplete and dropped, with its target.
use crate::data::sample::SEG as SEG_TOKEN;
use crate::data::tokenizer::{add_special, Tok};
use crate::error::{Error, Result};
use std::path::Path;

/// The `j`-th codebook token's text.
pub fn codebook_token(j: usize) -> String {
    format!("[SEG{j}]")
}

/// Words of the template, added to the tokenizer's training text so that they are
/// whole tokens.
pub const TEMPLATE_WORDS: &str = "USER: <image> ASSISTANT:";

/// The tokenizer of a segmentation model: the base tokenizer plus the codebook.
#[derive(Clone)]
pub struct SegTokenizer {
    /// The base tokenizer, the codebook tokens among its added tokens.
    pub tok: Tok,
    /// Token id of `[SEGj]`, j < S·L.
    pub codebook: Vec<u32>,
}

/// One prompt + answer, tokenized.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// BOS, prompt (one image token), answer with codebook groups, EOS.
    pub ids: Vec<u32>,
    /// Position of the image token in `ids`.
    pub image_pos: usize,
    /// First answer position (labels start here and run to the end).
    pub answer_start: usize,
    /// Position in `ids` of the first token of each codebook group, in `<seg>` order.
    pub groups: Vec<usize>,
}

impl SegTokenizer {
    /// Adds `[SEG0] … [SEG{n−1}]` to `tok`.
    pub fn new(mut tok: Tok, group_len: usize) -> Result<Self> {
        if group_len == 0 {
            return Err(Error::arg(
                "SegTokenizer::new",
                "a codebook group needs a token",
            ));
        }
        let codebook = (0..group_len)
            .map(|j| add_special(&mut tok.inner, &codebook_token(j)))
            .collect::<Result<Vec<_>>>()?;
        Ok(SegTokenizer { tok, codebook })
    }

    /// A world-style BPE trained on `texts` (questions and answers) and the template.
    pub fn train(texts: &[String], vocab_size: usize, group_len: usize) -> Result<Self> {
        let mut all: Vec<String> = texts.to_vec();
        // enough repeats that the template words merge into single tokens
        all.extend(std::iter::repeat_n(TEMPLATE_WORDS.to_string(), 64));
        Self::new(Tok::train(&all, vocab_size)?, group_len)
    }

    /// Loads `tokenizer.json` and finds (or adds) the codebook tokens.
    pub fn load(path: &Path, group_len: usize) -> Result<Self> {
        Self::new(Tok::load(path)?, group_len)
    }

    /// Writes `tokenizer.json` (codebook tokens included) to `path` through a temporary
    /// file and a rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = crate::fsio::temp_path(path);
        self.tok.save(&tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Vocabulary size including added tokens (the codebook among them).
    pub fn vocab_size(&self) -> usize {
        self.tok.vocab_size()
    }

    fn group_text(&self) -> String {
        (0..self.codebook.len()).map(codebook_token).collect()
    }

    /// BOS + `SYSTEM USER: <image> QUESTION ASSISTANT:`.
    pub fn prompt(&self, system: &str, question: &str) -> Result<(Vec<u32>, usize)> {
        let q = question.replace(SEG_TOKEN, " ");
        let text = if system.is_empty() {
            format!("USER: <image> {q} ASSISTANT:")
        } else {
            format!("{system} USER: <image> {q} ASSISTANT:")
        };
        let mut ids = vec![self.tok.bos];
        ids.extend(self.tok.encode(&text)?);
        let image_pos = ids
            .iter()
            .position(|&i| i == self.tok.image)
            .ok_or_else(|| Error::Tokenizer("the prompt lost its <image> token".into()))?;
        if ids[image_pos + 1..].contains(&self.tok.image) {
            return Err(Error::arg(
                "SegTokenizer::prompt",
                "the question itself contains an <image> token",
            ));
        }
        Ok((ids, image_pos))
    }

    /// The answer header `ASSISTANT:` as the prompt ends with it; empty when the
    /// tokenizer merges it with what comes before.
    pub fn answer_header(&self) -> Result<Vec<u32>> {
        let h = self.tok.encode("ASSISTANT:")?;
        let (p, _) = self.prompt("", "?")?;
        Ok(if p.ends_with(&h) { h } else { Vec::new() })
    }

    /// Prompt and answer for training: each `<seg>` of `answer` becomes a codebook group.
    pub fn encode(&self, system: &str, question: &str, answer: &str) -> Result<Encoded> {
        self.encode_reading(system, question, &[], answer)
    }

    /// The ids of an answer text as the model generates it: each `<seg>` a codebook
    /// group, no EOS.
    pub fn answer_ids(&self, answer: &str) -> Result<Vec<u32>> {
        self.tok
            .encode(&answer.replace(SEG_TOKEN, &self.group_text()))
    }

    /// [`Self::encode`] with answers to read before answering, in the ensemble's text
    /// layout (`crate::method::ensemble`): the prompt without its answer header, then
    /// each of `read` as [`Self::answer_ids`] gives it, then the header and the answer.
    /// Only the answer is labelled.  With `read` empty this is the plain template.
    pub fn encode_reading(
        &self,
        system: &str,
        question: &str,
        read: &[String],
        answer: &str,
    ) -> Result<Encoded> {
        let (mut ids, image_pos) = self.prompt(system, question)?;
        if !read.is_empty() {
            let header = self.answer_header()?;
            ids.truncate(ids.len() - header.len());
            for r in read {
                ids.extend(self.answer_ids(r)?);
            }
            ids.extend(header);
        }
        let answer_start = ids.len();
        ids.extend(self.answer_ids(answer)?);
        ids.push(self.tok.eos);
        let first = self.codebook[0];
        let groups: Vec<usize> = (answer_start..ids.len())
            .filter(|&p| ids[p] == first)
            .collect();
        let want = answer.matches(SEG_TOKEN).count();
        if groups.len() != want {
            return Err(Error::Tokenizer(format!(
                "answer with {want} <seg> tokenized into {} codebook groups",
                groups.len()
            )));
        }
        Ok(Encoded {
            ids,
            image_pos,
            answer_start,
            groups,
        })
    }

    /// Generated answer ids (EOS and after ignored) → the answer text with one `<seg>`
    /// per complete codebook group, and each complete group's start position in `ids`.
    pub fn decode_answer(&self, ids: &[u32]) -> Result<(String, Vec<usize>)> {
        let end = ids
            .iter()
            .position(|&i| i == self.tok.eos)
            .unwrap_or(ids.len());
        let ids = &ids[..end];
        let g = self.codebook.len();
        let mut clean = Vec::with_capacity(ids.len());
        let mut groups = Vec::new();
        let mut p = 0;
        while p < ids.len() {
            let id = ids[p];
            if self.codebook.contains(&id) {
                if ids.len() >= p + g && ids[p..p + g] == self.codebook[..] {
                    groups.push(p);
                    clean.push(self.tok.seg);
                    p += g;
                } else {
                    // an incomplete group: drop its tokens (and so its target)
                    p += 1;
                }
                continue;
            }
            if id != self.tok.bos && id != self.tok.image {
                clean.push(id);
            }
            p += 1;
        }
        let text = self.tok.decode(&clean)?;
        Ok((tidy(&text), groups))
    }
}

/// Collapses runs of spaces and trims (the codebook splits leave double spaces).
fn tidy(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
