// One SFTP symlink made with node's ssh2, for test_server_openssh.py's symlink test.
// ssh2 sends SYMLINK's paths in the draft's order unless the server's identification
// string starts with OpenSSH or dropbear, which meshsshd's does not.
// Usage: node sftp_symlink.js HOST PORT USER PRIVATE_KEY_FILE TARGET LINK_PATH
'use strict';

const fs = require('fs');
const { Client } = require('ssh2');

function fail(err) {
  console.error(`sftp_symlink.js: ${err.message}`);
  process.exit(1);
}

const [host, port, username, keyFile, target, linkPath] = process.argv.slice(2);
const conn = new Client();
conn.on('ready', () => {
  conn.sftp((err, sftp) => {
    if (err) fail(err);
    sftp.symlink(target, linkPath, (err) => {
      if (err) fail(err);
      conn.end();
    });
  });
});
conn.on('error', fail);
conn.connect({ host, port: Number(port), username, privateKey: fs.readFileSync(keyFile), readyTimeout: 20000 });
