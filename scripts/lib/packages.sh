# Debian packages the tests use besides Postgres: chromium + chromium-driver (the dashboard's
# browser test) and prometheus (its promtool checks /metrics). Installed when missing and we are
# root; otherwise the missing ones are named.
ensure_test_packages() {
    local missing=()
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
    command -v promtool >/dev/null || missing+=(prometheus)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "error: missing Debian packages: ${missing[*]} (apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "installing ${missing[*]} ..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; } ||
        { echo "error: could not install ${missing[*]} with apt-get" >&2; exit 1; }
}
