// A relying party built on openid-client (npm, not written by this project), driven by
// tests/test_interop_openid_client.py one step at a time:
//
//   node rp.mjs <step>   with a JSON object on stdin, prints one JSON object on stdout
//
// Every step discovers the hub afresh (cheap on loopback) so no state is kept between
// calls; the Python test carries the PKCE verifier, state, nonce and tokens. On failure
// it prints {"error": {...}} (what openid-client rejected and why) and exits 1.
import * as client from 'openid-client'

async function discover (input) {
  // openid-client refuses http issuers unless told otherwise: fine for loopback tests.
  // enableNonRepudiationChecks: the library then verifies an ID token's signature against
  // the hub's JWKS even when it comes straight from the token endpoint (it skips that by
  // default, relying on TLS), as a careful agency would have it do.
  return client.discovery(
    new URL(input.issuer),
    input.client_id,
    undefined,
    client.ClientSecretBasic(input.client_secret),
    { execute: [client.allowInsecureRequests, client.enableNonRepudiationChecks], timeout: 10 }
  )
}

function tokenOutput (tokens) {
  return { tokens: { ...tokens }, claims: tokens.claims() ?? null }
}

const steps = {
  async authorize (config, input) {
    const verifier = client.randomPKCECodeVerifier()
    const state = client.randomState()
    const nonce = client.randomNonce()
    const url = client.buildAuthorizationUrl(config, {
      redirect_uri: input.redirect_uri,
      scope: input.scope,
      code_challenge: await client.calculatePKCECodeChallenge(verifier),
      code_challenge_method: 'S256',
      state,
      nonce
    })
    return { url: url.href, verifier, state, nonce, metadata: config.serverMetadata() }
  },

  async code (config, input) {
    const tokens = await client.authorizationCodeGrant(config, new URL(input.callback_url), {
      pkceCodeVerifier: input.verifier,
      expectedState: input.state,
      expectedNonce: input.nonce,
      idTokenExpected: true
    })
    return tokenOutput(tokens)
  },

  async userinfo (config, input) {
    return { userinfo: await client.fetchUserInfo(config, input.access_token, input.sub) }
  },

  async refresh (config, input) {
    return tokenOutput(await client.refreshTokenGrant(config, input.refresh_token))
  },

  async clientCredentials (config, input) {
    const tokens = await client.clientCredentialsGrant(config, { scope: input.scope })
    return { tokens: { access_token: tokens.access_token, scope: tokens.scope,
                       token_type: tokens.token_type, expires_in: tokens.expires_in,
                       refresh_token: tokens.refresh_token ?? null } }
  },

  async introspect (config, input) {
    return { introspection: await client.tokenIntrospection(config, input.token) }
  },

  async revoke (config, input) {
    await client.tokenRevocation(config, input.token)
    return { revoked: true }
  },

  async logout (config, input) {
    const url = client.buildEndSessionUrl(config, {
      id_token_hint: input.id_token,
      post_logout_redirect_uri: input.post_logout_redirect_uri,
      state: input.state
    })
    return { url: url.href }
  }
}

function describe (err) {
  if (!(err instanceof Error)) return { message: String(err) }
  const out = { name: err.name, message: err.message }
  for (const key of ['code', 'error', 'error_description', 'status']) {
    if (err[key] !== undefined) out[key] = err[key]
  }
  if (err.cause !== undefined) {
    try {
      out.cause = err.cause instanceof Error ? describe(err.cause) : JSON.parse(JSON.stringify(err.cause))
    } catch {
      out.cause = String(err.cause)
    }
  }
  return out
}

async function main () {
  const step = steps[process.argv[2]]
  if (!step) throw new Error(`unknown step ${process.argv[2]}; one of ${Object.keys(steps)}`)
  let raw = ''
  for await (const chunk of process.stdin) raw += chunk
  const input = JSON.parse(raw)
  const config = await discover(input)
  return step(config, input)
}

main().then(
  (result) => { process.stdout.write(JSON.stringify(result) + '\n') },
  (err) => {
    process.stdout.write(JSON.stringify({ error: describe(err) }) + '\n')
    process.exitCode = 1
  }
)
