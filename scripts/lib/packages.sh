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

# A Python with the PyPI packages the integration tests drive: the official openai client
# (against `flywheel serve-model`), moto's S3 server (the artifact store on S3), and grpcio with
# grpcio-reflection (a generic gRPC client: reflection v1alpha, raw request bytes), and
# lm-eval's IFEval checkers (installed without lm-eval's dependencies: torch is not needed for
# them) to cross-check Flywheel's, and kubernetes-validate for the manifests in deploy/.
ensure_test_python() {
    local venv=target/pyenv
    if [ -x "$venv/bin/moto_server" ] && [ -x "$venv/bin/kubernetes-validate" ] && "$venv/bin/python" -c "import openai, moto, grpc, grpc_reflection, langdetect, immutabledict, nltk, packaging, importlib.util as u; assert u.find_spec('lm_eval')" 2>/dev/null; then
        return 0
    fi
    command -v python3 >/dev/null || { echo "error: python3 is missing (the openai-client and S3 tests need it)" >&2; exit 1; }
    echo "creating $venv with openai, moto[server], grpcio and grpcio-reflection from PyPI ..." >&2
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" ||
        { echo "error: python3 -m venv failed (install Debian's python3-venv)" >&2; exit 1; }
    "$venv/bin/pip" install -q 'openai>=1.40,<3' 'moto[server]>=5,<6' 'grpcio>=1.60' 'grpcio-reflection>=1.60' ||
        { echo "error: pip could not install openai, moto[server], grpcio and grpcio-reflection from PyPI" >&2; exit 1; }
    "$venv/bin/pip" install -q --no-deps 'lm-eval>=0.4.8,<0.5' &&
        "$venv/bin/pip" install -q langdetect immutabledict 'nltk>=3.9.1' packaging six ||
        { echo "error: pip could not install lm-eval (IFEval checkers), langdetect, immutabledict and nltk from PyPI" >&2; exit 1; }
    "$venv/bin/pip" install -q 'kubernetes-validate>=1.30' ||
        { echo "error: pip could not install kubernetes-validate from PyPI (the deploy/ manifests' test)" >&2; exit 1; }
}

# lm-evaluation-harness with its dependencies (and its API-model extra), in an environment of
# its own: the lm_eval template's test runs it for real against a served model.
ensure_lm_eval() {
    local venv=target/lmeval-env
    if [ -x "$venv/bin/lm_eval" ] && "$venv/bin/python" -c "import lm_eval, datasets, aiohttp" 2>/dev/null; then
        return 0
    fi
    echo "creating $venv with lm-eval[api] from PyPI ..." >&2
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" ||
        { echo "error: python3 -m venv failed (install Debian's python3-venv)" >&2; exit 1; }
    "$venv/bin/pip" install -q 'lm-eval[api]>=0.4.8,<0.5' ||
        { echo "error: pip could not install lm-eval[api] from PyPI (the lm_eval template's test)" >&2; exit 1; }
}
