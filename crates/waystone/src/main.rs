fn main() -> std::process::ExitCode {
    waystone_cli::main()
}
