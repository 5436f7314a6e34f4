//! Empty: see Cargo.toml. Never compiled for the targets Veil supports.
