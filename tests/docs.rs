//! Man pages and shell completions in `contrib/` are generated from the command
//! lines (clap_mangen, clap_complete); this test fails when they are stale.
//! Regenerate with `UPDATE_DOCS=1 cargo test --test docs`.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use knockgate::cli;

/// Every generated file: its path under `contrib/` and its content.
fn generated() -> Vec<(PathBuf, Vec<u8>)> {
    let commands = [
        (cli::knock::Args::command(), "knock", "1"),
        (cli::knockgate::Args::command(), "knockgate", "8"),
        (cli::knockgated::Args::command(), "knockgated", "8"),
        (cli::egress_window::Args::command(), "egress-window", "8"),
    ];
    let mut files = Vec::new();
    for (command, name, section) in commands {
        let mut page = Vec::new();
        clap_mangen::Man::new(command.clone())
            .section(section)
            .render(&mut page)
            .expect("render man page");
        files.push((PathBuf::from(format!("man/{name}.{section}")), page));
        for (shell, file) in [
            (Shell::Bash, format!("completions/bash/{name}")),
            (Shell::Zsh, format!("completions/zsh/_{name}")),
            (Shell::Fish, format!("completions/fish/{name}.fish")),
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut command.clone(), name, &mut out);
            files.push((PathBuf::from(file), out));
        }
    }
    files
}

#[test]
fn man_pages_and_completions_are_current() {
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let update = std::env::var_os("UPDATE_DOCS").is_some();
    for (path, content) in generated() {
        let full = contrib.join(&path);
        if update {
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, &content).unwrap();
        }
        let current = std::fs::read(&full).unwrap_or_default();
        assert!(
            current == content,
            "contrib/{} is stale: run UPDATE_DOCS=1 cargo test --test docs",
            path.display()
        );
    }
}

#[test]
fn every_program_documents_its_options() {
    let page = String::from_utf8(
        generated()
            .into_iter()
            .find(|(p, _)| p.ends_with("egress-window.8"))
            .unwrap()
            .1,
    )
    .unwrap();
    for option in ["host\\-wide", "\\-\\-to", "\\-\\-socket"] {
        assert!(page.contains(option), "egress-window(8) lacks {option}");
    }
}
