//! The `runnel-analyzer` binary: the analysis tier as its own process, configured from
//! `runnel.toml` / `RUNNEL_ANALYZER__…` (see [`runnel_analyzer::AnalyzerConfig`]).

fn main() -> std::process::ExitCode {
    runnel_server::main("runnel-analyzer", runnel_analyzer::run)
}
