//! `flywheel`: one binary whose subcommands are the user's entry points. It only parses
//! arguments and wires the library crates together.

mod cli;
mod demo;
mod pg;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Args::parse();
    match cli::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
