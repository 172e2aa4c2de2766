//! A Hugging Face `config.json`, read for its `model_type` and then parsed as that model.
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::model::{BertConfig, ClipVisionConfig, HfConfig, HfLlamaConfig, LlavaConfig, ModelType};

fuzz_target!(|data: &[u8]| {
    let p = popen_fuzz::scratch_file("config.json", data);
    if let Ok(c) = HfConfig::read(&p) {
        let f = c.fields();
        match c.model_type {
            ModelType::Llama => drop(HfLlamaConfig::from_fields(&f)),
            ModelType::ClipVision => drop(ClipVisionConfig::from_fields(&f)),
            ModelType::Bert => drop(BertConfig::from_fields(&f)),
            ModelType::Llava => drop(LlavaConfig::from_fields(&f)),
        }
    }
});
