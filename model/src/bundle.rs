//! A model ready to use: weights, tokenizer and chat template, from one GGUF file.

use std::path::Path;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::{LlamaWeights, ModelError};

/// Everything read from a model file.
#[derive(Debug)]
pub struct ModelBundle {
    /// `general.name`, or the file name.
    pub name: String,
    pub weights: LlamaWeights,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
}

impl ModelBundle {
    /// Read a GGUF model file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        let fallback = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_gguf(&file, &fallback)
    }

    pub fn from_gguf(file: &GgufFile, fallback_name: &str) -> Result<Self, ModelError> {
        let weights = LlamaWeights::from_gguf(file)?;
        let tokenizer = Tokenizer::from_gguf(file)?;
        if tokenizer.vocab_size() != weights.config.vocab_size {
            return Err(ModelError::InvalidConfig(format!(
                "the tokenizer has {} tokens but the embedding table has {} rows",
                tokenizer.vocab_size(),
                weights.config.vocab_size
            )));
        }
        let name = if file.has_key("general.name") {
            file.get_str("general.name")?.to_string()
        } else {
            fallback_name.to_string()
        };
        Ok(ModelBundle {
            name,
            weights,
            tokenizer,
            chat_template: ChatTemplate::from_gguf(file)?,
        })
    }

    /// The deterministic tiny random model (see [`crate::tiny`]).
    pub fn tiny() -> Result<Self, ModelError> {
        let file = GgufFile::from_bytes(crate::tiny::tiny_gguf(crate::tiny::TINY_SEED)?)?;
        Self::from_gguf(&file, "tiny")
    }

    /// Token ids for a user prompt: rendered as one user turn with the chat template (and
    /// the generation prompt), or taken as-is when `raw`. Control-token text is parsed.
    pub fn prompt_tokens(&self, prompt: &str, raw: bool) -> Result<Vec<u32>, ModelError> {
        let text = if raw {
            prompt.to_string()
        } else {
            self.chat_text(&[ChatMessage::new("user", prompt)])?
        };
        self.encode_prompt(&text)
    }

    /// Render a conversation with the chat template, ending with the assistant's turn.
    pub fn chat_text(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::Template("this model has no chat template; use --raw".into())
        })?;
        template.render(messages, true)
    }

    /// Tokenize prompt text (control tokens parsed), adding BOS if the model asks for it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        if self.tokenizer.add_bos {
            if let Some(bos) = self.tokenizer.bos {
                ids.push(bos);
            }
        }
        ids.extend(self.tokenizer.encode(text, true)?);
        Ok(ids)
    }
}
