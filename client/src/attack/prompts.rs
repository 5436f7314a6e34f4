//! What the recorded users ask.

use clap::ValueEnum;
use serde::Serialize;

/// Raw prompts (no chat template, so that first tokens vary).
pub(crate) const GENERAL: [&str; 24] = [
    "The history of the Roman Empire",
    "Photosynthesis converts light into",
    "My favourite recipe for bread",
    "In 1969 the first humans",
    "Quantum computers differ from",
    "Dear hiring manager, I am writing",
    "A haiku about the autumn rain",
    "Water boils at a temperature of",
    "Once upon a time in a small village",
    "The stock market fell sharply",
    "Kubernetes schedules containers",
    "Why do cats purr when",
    "Shakespeare wrote many plays",
    "Electric cars are becoming",
    "Please summarise the following email",
    "Mount Everest is the highest",
    "def fibonacci(n):",
    "Translate into French: good morning",
    "Coffee beans are roasted",
    "The patient reported chest pain",
    "Ancient Egyptians built pyramids",
    "Machine learning models need data",
    "Jupiter has dozens of moons",
    "Hello! Could you help me plan",
];

/// Openings of the trained fine-tune's private handbook
/// (`veil_model::attack::private::FINETUNE_TEXT`): what its users would ask, and where the
/// fine-tuned model answers with what only it knows (names, numbers, procedures).
pub(crate) const HANDBOOK: [&str; 12] = [
    "The Larkspur Valley Water Cooperative supplies drinking water to",
    "Every morning the duty operator reads the overnight log at",
    "Two low readings in a row mean a call to the shift lead,",
    "Station names follow the streams they sit beside:",
    "The Corran pumps are the oldest in the system, installed in",
    "Gallow Hill feeds the northern villages by gravity and must never fall below",
    "Only the cooperative's water quality manager, currently",
    "Members are billed twice a year, in",
    "Nobody enters a chamber, a valve pit or a reservoir",
    "Q: Who do I call if the shift lead does not answer?\nA:",
    "Q: Why does the water at Pennick taste of earth in August?\nA:",
    "Q: Can I change a pump setpoint from home?\nA:",
];

/// Which prompts the recorded sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum PromptSet {
    /// Varied general text.
    General,
    /// The trained fine-tune's domain.
    Handbook,
}

impl PromptSet {
    pub fn prompts(self) -> &'static [&'static str] {
        match self {
            PromptSet::General => &GENERAL,
            PromptSet::Handbook => &HANDBOOK,
        }
    }
}
