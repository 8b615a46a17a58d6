/// SeqPar's version (semantic versioning); CHANGELOG.md says what each version changed. `seqpar --version` prints it
/// with the commit the binary was built from.
public enum SeqParVersion {
    public static let number = "0.1.0"
}
