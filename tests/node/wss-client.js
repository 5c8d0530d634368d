// A WSS client on Node's TLS stack (the `ws` package): connects through the
// proxy with the test CA and an SNI name, sends N messages and expects each
// echoed back. Prints one JSON line; exits 1 on any failure.
// usage: node wss-client.js <wss-url> <ca.pem> <servername> <messages>
const fs = require("fs");
const WebSocket = require("ws");

const [url, caFile, servername, count] = process.argv.slice(2);
const n = Number(count || 10);
const ws = new WebSocket(url, { ca: fs.readFileSync(caFile), servername });
let server = "";
let echoed = 0;
const fail = (why) => {
  console.log(JSON.stringify({ ok: false, error: String(why), echoed }));
  process.exit(1);
};
setTimeout(() => fail("timed out"), 15000).unref();
ws.on("upgrade", (res) => (server = res.headers["x-server"] || ""));
ws.on("open", () => {
  const cert = ws._socket.getPeerCertificate();
  ws.cert = cert && cert.subjectaltname;
  ws.send("m0");
});
ws.on("message", (data) => {
  if (String(data) !== `m${echoed}`) fail(`expected m${echoed}, got ${data}`);
  echoed += 1;
  if (echoed === n) {
    console.log(JSON.stringify({ ok: true, echoed, server, san: ws.cert, tls: ws._socket.getProtocol() }));
    ws.close(1000);
    return;
  }
  ws.send(`m${echoed}`);
});
ws.on("close", () => process.exit(echoed === n ? 0 : 1));
ws.on("error", fail);
